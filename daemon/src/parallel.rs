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
