//! The one error type of the analysis.

use core::fmt;

/// Why an ELF file could not be analysed.
///
/// Every malformed input ends here: the analysis never panics and never reads outside
/// the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalysisError {
    /// The file could not be opened, inspected or mapped (the OS error text).
    Io(String),
    /// The bytes do not start with the ELF magic.
    NotElf,
    /// The file ends before a structure it declares (which one).
    Truncated(&'static str),
    /// A header or table is inconsistent (which one).
    Malformed(&'static str),
    /// A valid ELF that this analysis does not handle (32-bit, big-endian, object file...).
    Unsupported(&'static str),
    /// An ELF for another machine (the `e_machine` value).
    WrongArch(u16),
    /// No executable code in the file.
    NoCode,
    /// The analysis used up its CPU-time budget before finishing (see
    /// [`analyze_elf_within`](super::analyze_elf_within)); nothing was cached.
    BudgetExceeded,
}

impl fmt::Display for AnalysisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(msg) => write!(f, "{msg}"),
            Self::NotElf => f.write_str("not an ELF file"),
            Self::Truncated(what) => write!(f, "truncated ELF file: {what} extends past the end"),
            Self::Malformed(what) => write!(f, "malformed ELF file: {what}"),
            Self::Unsupported(what) => write!(f, "unsupported ELF file: {what}"),
            Self::WrongArch(m) => write!(
                f,
                "wrong architecture: {} (only x86-64 is supported)",
                machine_name(*m)
            ),
            Self::NoCode => f.write_str("no executable code in the ELF file"),
            Self::BudgetExceeded => f.write_str("analysis stopped: CPU-time budget exceeded"),
        }
    }
}

impl std::error::Error for AnalysisError {}

/// A readable name for the machines people are likely to feed the tool by mistake.
fn machine_name(m: u16) -> String {
    let name = match m {
        3 => "i386",
        8 => "mips",
        20 => "powerpc",
        21 => "powerpc64",
        40 => "arm",
        183 => "aarch64",
        243 => "riscv",
        258 => "loongarch",
        _ => return format!("e_machine {m}"),
    };
    name.to_string()
}
