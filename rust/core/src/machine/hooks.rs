//! Callbacks a machine runs at points of its life that its parts cannot see for themselves.

use std::sync::Arc;

/// A callback run after each restore.
pub type RestoreHook = Box<dyn Fn() + Send + Sync>;

/// The callbacks to run after each restore, in the order they were added. Cloning shares them, so
/// that they can run without the machine's state locked.
#[derive(Clone, Default)]
pub(super) struct RestoreHooks(Vec<Arc<dyn Fn() + Send + Sync>>);

impl RestoreHooks {
    pub(super) fn add(&mut self, hook: RestoreHook) {
        self.0.push(Arc::from(hook));
    }

    pub(super) fn run(&self) {
        for hook in &self.0 {
            hook();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn hooks_run_each_time_in_the_order_added() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut hooks = RestoreHooks::default();
        hooks.run();
        for name in ["first", "second"] {
            let calls = calls.clone();
            hooks.add(Box::new(move || calls.lock().unwrap().push(name)));
        }
        let shared = hooks.clone();
        hooks.run();
        shared.run();
        assert_eq!(*calls.lock().unwrap(), ["first", "second", "first", "second"]);
    }
}
