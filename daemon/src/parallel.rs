//! Two pieces of work side by side (pure: no kernel, no host probing).

/// `(a(), b())`, `b` on a second thread named `name`. If no thread can be
/// started (a cgroup's task limit, memory), `b` runs here after `a`: the
/// work is slower, never refused. A panic of `b` goes on here, as it would
/// inline.
pub fn both<A, B: Send>(name: &str, a: impl FnOnce() -> A, b: impl Fn() -> B + Sync) -> (A, B) {
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(s, &b);
        let a = a();
        let b = match thread {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => b(),
        };
        (a, b)
    })
}

/// Below this much work (rules, entries, prefixes), [`both_over`] runs
/// both pieces here: starting and joining a thread costs about what a few
/// thousand items of the compile do (clone, stack mapping, signal masks,
/// the join's wake-up), and a single rule added to a small set went
/// through seven of them.
pub const PARALLEL_MIN: usize = 4096;

/// [`both`] when `weight` (the items the work goes over) is at least
/// [`PARALLEL_MIN`]; otherwise `(a(), b())` on this thread.
pub fn both_over<A, B: Send>(
    weight: usize,
    name: &str,
    a: impl FnOnce() -> A,
    b: impl Fn() -> B + Sync,
) -> (A, B) {
    if weight < PARALLEL_MIN {
        let a = a();
        (a, b())
    } else {
        both(name, a, b)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::{PARALLEL_MIN, both, both_over};

    #[test]
    fn small_work_stays_on_this_thread_and_large_work_does_not() {
        let here = std::thread::current().id();
        let (_, small) = both_over(
            PARALLEL_MIN - 1,
            "second",
            || (),
            || std::thread::current().id(),
        );
        assert_eq!(small, here);
        let (_, large) = both_over(
            PARALLEL_MIN,
            "second",
            || (),
            || std::thread::current().id(),
        );
        assert_ne!(large, here);
    }

    #[test]
    fn both_answer_and_b_runs_on_the_named_thread() {
        let (a, b) = both(
            "second",
            || 1 + 1,
            || std::thread::current().name().map(str::to_owned),
        );
        assert_eq!(a, 2);
        assert_eq!(b.as_deref(), Some("second"));
    }

    #[test]
    #[should_panic(expected = "b failed")]
    fn a_panic_of_b_goes_on_here() {
        both("second", || (), || panic!("b failed"));
    }

    #[test]
    fn a_panic_of_a_waits_for_b() {
        let b_done = AtomicBool::new(false);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            both(
                "second",
                || panic!("a failed"),
                || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    b_done.store(true, Ordering::SeqCst);
                },
            )
        }));
        assert!(caught.is_err());
        assert!(b_done.load(Ordering::SeqCst), "b was not joined");
    }
}
