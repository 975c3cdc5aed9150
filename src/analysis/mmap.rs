//! A read-only private mapping of a whole file: the analysis reads the ELF in place
//! instead of copying tens of megabytes into a Vec.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::AnalysisError;

/// What identifies a file's contents when it has no build-id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

pub(crate) struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
    pub id: FileId,
}

impl Mapping {
    pub fn open(path: &Path) -> Result<Mapping, AnalysisError> {
        let file = File::open(path).map_err(|e| AnalysisError::Io(e.to_string()))?;
        let meta = file
            .metadata()
            .map_err(|e| AnalysisError::Io(e.to_string()))?;
        if !meta.is_file() {
            return Err(AnalysisError::Io("not a regular file".into()));
        }
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        };
        let len =
            usize::try_from(meta.len()).map_err(|_| AnalysisError::Io("file too large".into()))?;
        if len == 0 {
            return Err(AnalysisError::NotElf);
        }
        // SAFETY: a fresh read-only private mapping of an open descriptor; the kernel
        // validates every argument and reports failure as MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(AnalysisError::Io(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        Ok(Mapping { ptr, len, id })
    }

    /// The file's bytes. A file truncated by another process while mapped faults
    /// (SIGBUS): the usual caveat of reading through a mapping.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of `len` bytes owned by `self`; it
        // stays mapped until `drop`, which the returned borrow cannot outlive.
        unsafe { core::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `open`, once; no borrow of it
        // survives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}
