//! Rust log records into Python's `logging`, under the `kvmkit` loggers: the core's
//! `kvmkit_core::devices::virtio::mmio` logs as `kvmkit.core.devices.virtio.mmio`, and any other
//! crate's target `x::y` as `kvmkit.x.y`.

use log::{Log, Metadata, Record};

struct KvmkitLogger(pyo3_log::Logger);

/// The Rust target whose Python logger name (with `::` as `.`) is the one records should use.
fn renamed(target: &str) -> String {
    match target.strip_prefix("kvmkit_core") {
        Some(rest) => format!("kvmkit::core{rest}"),
        None => format!("kvmkit::{target}"),
    }
}

impl Log for KvmkitLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let target = renamed(metadata.target());
        self.0.enabled(&Metadata::builder().level(metadata.level()).target(&target).build())
    }

    fn log(&self, record: &Record<'_>) {
        let target = renamed(record.target());
        self.0.log(
            &Record::builder()
                .args(*record.args())
                .level(record.level())
                .target(&target)
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Installs the forwarding, once per process (a second call changes nothing).
pub fn install() {
    if log::set_boxed_logger(Box::new(KvmkitLogger(pyo3_log::Logger::default()))).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn every_target_lands_under_kvmkit() {
        assert_eq!(renamed("kvmkit_core::devices::virtio::mmio"), "kvmkit::core::devices::virtio::mmio");
        assert_eq!(renamed("kvmkit_core"), "kvmkit::core");
        assert_eq!(renamed("_core::vm"), "kvmkit::_core::vm");
    }
}
