//! The ELF container: validated headers, the address space of the file, and the tables
//! the analysis reads (symbols, dynamic relocations, code ranges, `.eh_frame_hdr`,
//! build-id).
//!
//! goblin parses the headers and tables; every offset and size taken from the file is
//! checked here against the byte slice before it is used, so a corrupt file is an
//! [`AnalysisError`], never an out-of-bounds read.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::dynamic::{self, Dynamic};
use goblin::elf::program_header::{self as ph, ProgramHeader};
use goblin::elf::section_header::{self as sh, SectionHeader};
use goblin::elf::{Elf as GoblinElf, RelocSection, Symtab, header};

use super::error::AnalysisError;

/// `SHT_RELR` (packed relative relocations); goblin has no constant for it.
const SHT_RELR: u32 = 19;
const DT_RELRSZ: u64 = 35;
const DT_RELR: u64 = 36;
const NT_GNU_BUILD_ID: u32 = 3;
const SYM_SIZE: u64 = 24;
const RELA_SIZE: usize = 24;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const SHDR_SIZE: usize = 64;

/// A `PT_LOAD` segment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Load {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub exec: bool,
}

/// A range of code in the file: virtual addresses `start..end`, file bytes from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CodeRange {
    pub start: u64,
    pub end: u64,
    pub offset: usize,
}

/// A symbol table with its string table.
pub(crate) struct SymTable<'a> {
    pub syms: Symtab<'a>,
    pub strs: &'a [u8],
}

impl<'a> SymTable<'a> {
    /// The NUL-terminated name at `off` (empty when out of range).
    pub fn name(&self, off: usize) -> &'a [u8] {
        let tail = self.strs.get(off..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        tail.get(..end).unwrap_or_default()
    }
}

/// The parsed, validated file.
pub(crate) struct Elf<'a> {
    pub bytes: &'a [u8],
    /// `ET_DYN`: addresses are link-time and slots need relocations to hold pointers.
    pub pie: bool,
    pub loads: Vec<Load>,
    /// Code to scan for call sites (PLT excluded).
    pub code: Vec<CodeRange>,
    /// `.plt`, `.plt.sec`, `.plt.got`.
    pub plt: Vec<CodeRange>,
    /// `.dynsym` (the one relocations refer to), when present.
    pub dynsym: Option<SymTable<'a>>,
    /// `.symtab`, when present.
    pub symtab: Option<SymTable<'a>>,
    /// Dynamic RELA tables (`.rela.dyn`, `.rela.plt`).
    pub relocs: Vec<RelocSection<'a>>,
    /// Packed relative relocations (`.relr.dyn`).
    pub relr: Vec<&'a [u8]>,
    pub eh_frame_hdr: Option<u64>,
    pub build_id: Option<&'a [u8]>,
}

fn ctx() -> Ctx {
    Ctx::new(Container::Big, Endian::Little)
}

/// Checks the identification bytes and machine: the cheap part every entry point needs.
fn check_ident(bytes: &[u8]) -> Result<header::Header, AnalysisError> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(AnalysisError::NotElf);
    }
    match bytes.get(header::EI_CLASS) {
        Some(&header::ELFCLASS64) => {}
        Some(&header::ELFCLASS32) => return Err(AnalysisError::Unsupported("32-bit ELF")),
        _ => return Err(AnalysisError::Malformed("ELF class")),
    }
    match bytes.get(header::EI_DATA) {
        Some(&header::ELFDATA2LSB) => {}
        Some(&header::ELFDATA2MSB) => return Err(AnalysisError::Unsupported("big-endian ELF")),
        _ => return Err(AnalysisError::Malformed("ELF data encoding")),
    }
    if bytes.len() < EHDR_SIZE {
        return Err(AnalysisError::Truncated("ELF header"));
    }
    let hdr = GoblinElf::parse_header(bytes).map_err(|_| AnalysisError::Malformed("ELF header"))?;
    if hdr.e_machine != header::EM_X86_64 {
        return Err(AnalysisError::WrongArch(hdr.e_machine));
    }
    match hdr.e_type {
        header::ET_EXEC | header::ET_DYN => Ok(hdr),
        header::ET_REL => Err(AnalysisError::Unsupported("relocatable object file")),
        header::ET_CORE => Err(AnalysisError::Unsupported("core dump")),
        _ => Err(AnalysisError::Unsupported(
            "not an executable or shared object",
        )),
    }
}

fn program_headers(
    bytes: &[u8],
    hdr: &header::Header,
) -> Result<Vec<ProgramHeader>, AnalysisError> {
    if hdr.e_phnum == 0 {
        return Err(AnalysisError::Malformed("no program headers"));
    }
    if usize::from(hdr.e_phentsize) != PHDR_SIZE {
        return Err(AnalysisError::Malformed("program header entry size"));
    }
    let end = (hdr.e_phnum as u64)
        .checked_mul(PHDR_SIZE as u64)
        .and_then(|n| n.checked_add(hdr.e_phoff));
    if end.is_none_or(|e| e > bytes.len() as u64) {
        return Err(AnalysisError::Truncated("program header table"));
    }
    ProgramHeader::parse(bytes, hdr.e_phoff as usize, usize::from(hdr.e_phnum), ctx())
        .map_err(|_| AnalysisError::Malformed("program header table"))
}

/// The GNU build-id from the `PT_NOTE` segments, without parsing anything else.
pub(crate) fn quick_build_id(bytes: &[u8]) -> Result<Option<&[u8]>, AnalysisError> {
    let hdr = check_ident(bytes)?;
    let phdrs = program_headers(bytes, &hdr)?;
    Ok(build_id(bytes, &phdrs))
}

fn build_id<'a>(bytes: &'a [u8], phdrs: &[ProgramHeader]) -> Option<&'a [u8]> {
    phdrs
        .iter()
        .filter(|p| p.p_type == ph::PT_NOTE)
        .find_map(|p| {
            let notes = slice(bytes, p.p_offset, p.p_filesz)?;
            find_note(notes, NT_GNU_BUILD_ID, b"GNU\0")
        })
}

/// Walks a note segment (4-byte aligned entries) for the note `(kind, name)`.
fn find_note<'a>(mut notes: &'a [u8], kind: u32, name: &[u8]) -> Option<&'a [u8]> {
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0)? as usize;
        let descsz = u32_at(notes, 4)? as usize;
        let ntype = u32_at(notes, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = align4(name_end)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let this_name = notes.get(12..name_end)?;
        let desc = notes.get(desc_start..desc_end)?;
        if ntype == kind && this_name == name && !desc.is_empty() && desc.len() <= 64 {
            return Some(desc);
        }
        notes = notes.get(align4(desc_end)?..)?;
    }
    None
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|n| n & !3)
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// `bytes[off..off + len]` with the arithmetic checked.
fn slice(bytes: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    bytes.get(start..end)
}

impl<'a> Elf<'a> {
    /// Parses and validates `bytes` (the file's contents).
    pub fn parse(bytes: &'a [u8]) -> Result<Elf<'a>, AnalysisError> {
        let hdr = check_ident(bytes)?;
        let phdrs = program_headers(bytes, &hdr)?;
        let loads = loads(bytes, &phdrs)?;
        let mut elf = Elf {
            bytes,
            pie: hdr.e_type == header::ET_DYN,
            loads,
            code: Vec::new(),
            plt: Vec::new(),
            dynsym: None,
            symtab: None,
            relocs: Vec::new(),
            relr: Vec::new(),
            eh_frame_hdr: None,
            build_id: build_id(bytes, &phdrs),
        };
        let shdrs = section_headers(bytes, &hdr)?;
        if shdrs.is_empty() {
            elf.read_segments(&phdrs)?;
        } else {
            elf.read_sections(&hdr, &shdrs)?;
        }
        if elf.eh_frame_hdr.is_none() {
            elf.eh_frame_hdr = phdrs
                .iter()
                .find(|p| p.p_type == ph::PT_GNU_EH_FRAME)
                .map(|p| p.p_vaddr);
        }
        if elf.code.is_empty() && elf.plt.is_empty() {
            return Err(AnalysisError::NoCode);
        }
        Ok(elf)
    }

    /// Section headers give precise code ranges, PLT sections and `.symtab`.
    fn read_sections(
        &mut self,
        hdr: &header::Header,
        shdrs: &[SectionHeader],
    ) -> Result<(), AnalysisError> {
        let names = section_names(self.bytes, hdr, shdrs)?;
        for s in shdrs {
            if s.sh_type == sh::SHT_NOBITS || s.sh_size == 0 {
                continue;
            }
            if slice(self.bytes, s.sh_offset, s.sh_size).is_none() {
                return Err(AnalysisError::Truncated("section"));
            }
            let name = cstr(names, s.sh_name);
            self.section(s, name, shdrs)?;
        }
        if self.code.is_empty() {
            self.code = self.exec_segments();
        }
        if self.dynsym.is_none() {
            // A stripped section table may have lost .dynsym but kept PT_DYNAMIC.
            self.dynamic_tables_if_missing()?;
        }
        Ok(())
    }

    fn section(
        &mut self,
        s: &SectionHeader,
        name: &[u8],
        shdrs: &[SectionHeader],
    ) -> Result<(), AnalysisError> {
        let flags = s.sh_flags;
        if s.sh_type == sh::SHT_PROGBITS
            && flags & u64::from(sh::SHF_EXECINSTR) != 0
            && flags & u64::from(sh::SHF_ALLOC) != 0
        {
            let range = CodeRange {
                start: s.sh_addr,
                end: s
                    .sh_addr
                    .checked_add(s.sh_size)
                    .ok_or(AnalysisError::Malformed("section address"))?,
                offset: s.sh_offset as usize,
            };
            if matches!(name, b".plt" | b".plt.sec" | b".plt.got" | b".iplt") {
                self.plt.push(range);
            } else {
                self.code.push(range);
            }
            return Ok(());
        }
        match s.sh_type {
            sh::SHT_SYMTAB => self.symtab = Some(self.sym_table(s, shdrs)?),
            sh::SHT_DYNSYM => self.dynsym = Some(self.sym_table(s, shdrs)?),
            sh::SHT_RELA if flags & u64::from(sh::SHF_ALLOC) != 0 => {
                self.relocs.push(self.rela(s.sh_offset, s.sh_size)?);
            }
            SHT_RELR => self.relr.extend(slice(self.bytes, s.sh_offset, s.sh_size)),
            _ if name == b".eh_frame_hdr" => self.eh_frame_hdr = Some(s.sh_addr),
            _ => {}
        }
        Ok(())
    }

    fn sym_table(
        &self,
        s: &SectionHeader,
        shdrs: &[SectionHeader],
    ) -> Result<SymTable<'a>, AnalysisError> {
        if s.sh_entsize != SYM_SIZE && s.sh_entsize != 0 {
            return Err(AnalysisError::Malformed("symbol table entry size"));
        }
        let strs = shdrs
            .get(s.sh_link as usize)
            .and_then(|t| slice(self.bytes, t.sh_offset, t.sh_size))
            .ok_or(AnalysisError::Malformed("symbol string table"))?;
        let count = (s.sh_size / SYM_SIZE) as usize;
        let syms = Symtab::parse(self.bytes, s.sh_offset as usize, count, ctx())
            .map_err(|_| AnalysisError::Malformed("symbol table"))?;
        Ok(SymTable { syms, strs })
    }

    fn rela(&self, off: u64, size: u64) -> Result<RelocSection<'a>, AnalysisError> {
        if slice(self.bytes, off, size).is_none() {
            return Err(AnalysisError::Truncated("relocation table"));
        }
        let size = size as usize / RELA_SIZE * RELA_SIZE;
        RelocSection::parse(self.bytes, off as usize, size, true, ctx())
            .map_err(|_| AnalysisError::Malformed("relocation table"))
    }

    /// Without section headers: code from executable segments, tables from `PT_DYNAMIC`.
    fn read_segments(&mut self, phdrs: &[ProgramHeader]) -> Result<(), AnalysisError> {
        self.code = self.exec_segments();
        self.dynamic_tables(phdrs)
    }

    fn dynamic_tables_if_missing(&mut self) -> Result<(), AnalysisError> {
        // Reparse the program headers only in this rare case.
        let hdr = check_ident(self.bytes)?;
        let phdrs = program_headers(self.bytes, &hdr)?;
        if self.relocs.is_empty() && self.relr.is_empty() {
            return self.dynamic_tables(&phdrs);
        }
        Ok(())
    }

    fn dynamic_tables(&mut self, phdrs: &[ProgramHeader]) -> Result<(), AnalysisError> {
        let dynamic = match Dynamic::parse(self.bytes, phdrs, ctx()) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(_) => return Err(AnalysisError::Malformed("dynamic section")),
        };
        let tag = |t: u64| dynamic.dyns.iter().find(|d| d.d_tag == t).map(|d| d.d_val);
        for (addr_tag, size_tag) in [
            (dynamic::DT_RELA, dynamic::DT_RELASZ),
            (dynamic::DT_JMPREL, dynamic::DT_PLTRELSZ),
        ] {
            if let (Some(addr), Some(size)) = (tag(addr_tag), tag(size_tag)) {
                let off = self
                    .file_offset(addr)
                    .ok_or(AnalysisError::Malformed("dynamic relocation address"))?;
                self.relocs.push(self.rela(off, size)?);
            }
        }
        if let (Some(addr), Some(size)) = (tag(DT_RELR), tag(DT_RELRSZ)) {
            let off = self
                .file_offset(addr)
                .ok_or(AnalysisError::Malformed("DT_RELR address"))?;
            self.relr.extend(slice(self.bytes, off, size));
        }
        if let (Some(sym), Some(str_addr), Some(str_size)) = (
            tag(dynamic::DT_SYMTAB),
            tag(dynamic::DT_STRTAB),
            tag(dynamic::DT_STRSZ),
        ) {
            self.dynsym = self.dynsym_from_dynamic(sym, str_addr, str_size);
        }
        Ok(())
    }

    /// `.dynsym` has no size in `PT_DYNAMIC`: cover every symbol a relocation names.
    fn dynsym_from_dynamic(&self, sym: u64, str_addr: u64, str_size: u64) -> Option<SymTable<'a>> {
        let count = self
            .relocs
            .iter()
            .flat_map(|r| r.iter())
            .map(|r| r.r_sym)
            .max()
            .map_or(0, |m| m.saturating_add(1));
        let sym_off = self.file_offset(sym)?;
        let strs = slice(self.bytes, self.file_offset(str_addr)?, str_size)?;
        let syms = Symtab::parse(self.bytes, usize::try_from(sym_off).ok()?, count, ctx()).ok()?;
        Some(SymTable { syms, strs })
    }

    fn exec_segments(&self) -> Vec<CodeRange> {
        self.loads
            .iter()
            .filter(|l| l.exec && l.filesz > 0)
            .map(|l| CodeRange {
                start: l.vaddr,
                end: l.vaddr + l.filesz,
                offset: l.offset as usize,
            })
            .collect()
    }

    /// The file offset of virtual address `vaddr` (file-backed part of a segment only).
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads.iter().find_map(|l| {
            let d = vaddr.checked_sub(l.vaddr)?;
            (d < l.filesz).then(|| l.offset + d)
        })
    }

    /// The file bytes from `vaddr` to the end of its segment's file-backed part.
    pub fn bytes_at(&self, vaddr: u64) -> Option<&'a [u8]> {
        self.loads.iter().find_map(|l| {
            let d = vaddr.checked_sub(l.vaddr)?;
            if d >= l.filesz {
                return None;
            }
            slice(self.bytes, l.offset + d, l.filesz - d)
        })
    }

    /// `len` bytes at `vaddr`, if the file holds all of them.
    pub fn read(&self, vaddr: u64, len: u64) -> Option<&'a [u8]> {
        self.bytes_at(vaddr)?.get(..usize::try_from(len).ok()?)
    }

    pub fn read_u64(&self, vaddr: u64) -> Option<u64> {
        u64_at(self.read(vaddr, 8)?, 0)
    }

    pub fn read_u32(&self, vaddr: u64) -> Option<u32> {
        u32_at(self.read(vaddr, 4)?, 0)
    }

    /// Whether `vaddr` lies in an executable segment's file-backed bytes.
    pub fn is_code(&self, vaddr: u64) -> bool {
        self.loads
            .iter()
            .any(|l| l.exec && vaddr >= l.vaddr && vaddr - l.vaddr < l.filesz)
    }

    /// Whether `vaddr` lies in a PLT section.
    pub fn in_plt(&self, vaddr: u64) -> bool {
        self.plt.iter().any(|r| vaddr >= r.start && vaddr < r.end)
    }

    /// Total size of the code (scanned ranges and PLT).
    pub fn text_bytes(&self) -> u64 {
        self.code
            .iter()
            .chain(self.plt.iter())
            .map(|r| r.end - r.start)
            .sum()
    }

    /// The file bytes of a code range.
    pub fn range_bytes(&self, r: &CodeRange) -> &'a [u8] {
        slice(self.bytes, r.offset as u64, r.end - r.start).unwrap_or_default()
    }
}

fn loads(bytes: &[u8], phdrs: &[ProgramHeader]) -> Result<Vec<Load>, AnalysisError> {
    let mut out = Vec::with_capacity(phdrs.len());
    for p in phdrs.iter().filter(|p| p.p_type == ph::PT_LOAD) {
        if slice(bytes, p.p_offset, p.p_filesz).is_none() {
            return Err(AnalysisError::Truncated("loadable segment"));
        }
        if p.p_vaddr.checked_add(p.p_memsz.max(p.p_filesz)).is_none() {
            return Err(AnalysisError::Malformed("segment address"));
        }
        out.push(Load {
            vaddr: p.p_vaddr,
            offset: p.p_offset,
            filesz: p.p_filesz,
            exec: p.p_flags & ph::PF_X != 0,
        });
    }
    if !out.iter().any(|l| l.exec && l.filesz > 0) {
        return Err(AnalysisError::NoCode);
    }
    Ok(out)
}

fn section_headers(
    bytes: &[u8],
    hdr: &header::Header,
) -> Result<Vec<SectionHeader>, AnalysisError> {
    if hdr.e_shoff == 0 {
        return Ok(Vec::new());
    }
    if usize::from(hdr.e_shentsize) != SHDR_SIZE {
        return Err(AnalysisError::Malformed("section header entry size"));
    }
    let count = u64::from(hdr.e_shnum).max(1);
    if slice(bytes, hdr.e_shoff, count * SHDR_SIZE as u64).is_none() {
        return Err(AnalysisError::Truncated("section header table"));
    }
    SectionHeader::parse(bytes, hdr.e_shoff as usize, usize::from(hdr.e_shnum), ctx())
        .map_err(|_| AnalysisError::Malformed("section header table"))
}

fn section_names<'a>(
    bytes: &'a [u8],
    hdr: &header::Header,
    shdrs: &[SectionHeader],
) -> Result<&'a [u8], AnalysisError> {
    let mut idx = u32::from(hdr.e_shstrndx);
    if idx == sh::SHN_XINDEX {
        idx = shdrs.first().map_or(0, |s| s.sh_link);
    }
    match shdrs.get(idx as usize) {
        Some(s) => slice(bytes, s.sh_offset, s.sh_size)
            .ok_or(AnalysisError::Truncated("section name table")),
        None => Ok(&[]),
    }
}

fn cstr(table: &[u8], off: usize) -> &[u8] {
    let tail = table.get(off..).unwrap_or_default();
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    tail.get(..end).unwrap_or_default()
}
