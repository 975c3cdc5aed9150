//! A CPU-time budget for one analysis: the thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`) read every few dozen functions, never per instruction,
//! so an analysis stops a little after its budget, not exactly at it.

use core::time::Duration;

use super::error::AnalysisError;

/// Functions handled between two readings of the clock (a reading costs ~50 ns; a
/// function of a large program takes 5-50 us).
const CHECK_EVERY: u32 = 32;

/// The budget of the running analysis.
pub(crate) struct Budget {
    /// Thread CPU time (ns) at which the analysis must stop; `None`: unlimited.
    deadline: Option<u64>,
    /// Functions left before the next reading.
    countdown: u32,
}

impl Budget {
    pub fn unlimited() -> Budget {
        Budget {
            deadline: None,
            countdown: CHECK_EVERY,
        }
    }

    /// A budget of `limit` CPU time from now.
    pub fn new(limit: Duration) -> Budget {
        let ns = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        Budget {
            deadline: Some(thread_cpu_ns().saturating_add(ns)),
            countdown: CHECK_EVERY,
        }
    }

    /// Reads the clock now: an error once the budget is spent.
    pub fn check(&mut self) -> Result<(), AnalysisError> {
        self.countdown = CHECK_EVERY;
        match self.deadline {
            Some(d) if thread_cpu_ns() > d => Err(AnalysisError::BudgetExceeded),
            _ => Ok(()),
        }
    }

    /// Counts one function; reads the clock every [`CHECK_EVERY`] of them.
    #[inline]
    pub fn tick(&mut self) -> Result<(), AnalysisError> {
        if self.deadline.is_none() {
            return Ok(());
        }
        self.countdown -= 1;
        if self.countdown == 0 {
            return self.check();
        }
        Ok(())
    }
}

/// CPU time consumed by the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the
    // kernel always supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no per-thread CPU clock")]
    fn zero_budget_runs_out_and_unlimited_never_does() {
        let mut b = Budget::new(Duration::ZERO);
        // Burn a little CPU so that the clock moves past the deadline.
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = core::hint::black_box(x.wrapping_add(i));
        }
        assert_eq!(b.check(), Err(AnalysisError::BudgetExceeded));
        let mut u = Budget::unlimited();
        for _ in 0..1000 {
            assert_eq!(u.tick(), Ok(()));
        }
    }
}
