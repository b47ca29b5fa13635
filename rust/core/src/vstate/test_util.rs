//! Small long-mode guests on real vCPUs, for the tests of this module. Tests that use them skip
//! (with a message) when the host has no `/dev/kvm`.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use kvm_bindings::kvm_xcrs;

use crate::arch::x86_64::layout::BOOT_STACK_TOP;
use crate::arch::x86_64::mode::CpuMode;
use crate::bus::DeviceError;
use crate::config::{MachineConfig, MemoryRegionConfig};
use crate::vstate::exit::{ExitReason, IoError, IoHandler};
use crate::vstate::kvm::Kvm;
use crate::vstate::memory;
use crate::vstate::runner::{run_vcpu, Kicker, RunControl};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// Where the guest's code goes.
pub const CODE_ADDR: u64 = 0x1_0000;
/// A write here ends the run once served: the guest's checkpoints.
pub const CHECKPOINT_PORT: u16 = 0x80;
/// The guest reports values here, 32 bits at a time.
pub const REPORT_PORT: u16 = 0x81;
/// A read here returns [`PORT_INPUT`] and ends the run once served.
pub const INPUT_PORT: u16 = 0x83;
/// What [`INPUT_PORT`] reads.
pub const PORT_INPUT: u32 = 0xfeed_beef;
/// An MMIO read here returns [`MMIO_INPUT`] and ends the run once served.
pub const INPUT_MMIO: u64 = 0xd000_0000;
/// What [`INPUT_MMIO`] reads.
pub const MMIO_INPUT: u32 = 0x600d_cafe;

const CR0_EM: u64 = 1 << 2;
const CR0_MP: u64 = 1 << 1;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
/// x87, SSE and AVX state enabled.
const XCR0_AVX: u64 = 0b111;

/// The shared KVM handle, or `None` (and a note) when this host has no `/dev/kvm`.
pub fn kvm() -> Option<Arc<Kvm>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return None;
    }
    Some(Kvm::shared().expect("/dev/kvm exists but cannot be used"))
}

/// Whether guests can use AVX here: KVM offers AVX and XSAVE, with the AVX state in XCR0.
pub fn avx_usable(kvm: &Kvm) -> bool {
    let entries = kvm.supported_cpuid().as_slice();
    let leaf = |function: u32| entries.iter().find(|e| e.function == function && e.index == 0);
    let features = leaf(1).map_or(0, |e| e.ecx);
    let xcr0 = leaf(0xd).map_or(0, |e| e.eax);
    features & (1 << 26) != 0 && features & (1 << 28) != 0 && xcr0 & 0b100 != 0
}

/// Whether guests can run AVX instructions here. Not under an instruction emulator (as on a
/// paravirtualized KVM, which emulates every instruction of such small guests): KVM's emulator
/// knows no VEX-encoded instruction.
pub fn guest_runs_avx(kvm: &Kvm) -> bool {
    static RUNS: OnceLock<bool> = OnceLock::new();
    *RUNS.get_or_init(|| {
        // vpxor xmm0, xmm0, xmm0; out 0x80, al
        let mut probe = Guest::build(kvm, false, &[0xc5, 0xf9, 0xef, 0xc0, 0xe6, 0x80], false);
        avx_usable(kvm) && probe.run().0 == ExitReason::Stopped
    })
}

/// The configuration of the small test VMs: 16 MiB, one vCPU, with or without KVM's irqchip
/// (and PIT).
pub fn config(irqchip: bool) -> MachineConfig {
    MachineConfig {
        memory: vec![MemoryRegionConfig { guest_addr: 0, size: 16 << 20 }],
        irqchip,
        pit: irqchip,
        ..MachineConfig::default()
    }
}

/// A VM with one vCPU in long mode at [`CODE_ADDR`], SSE on, and AVX on when the host has it.
/// RDI is 1 when the guest can run AVX instructions ([`guest_runs_avx`]), else 0.
pub struct Guest {
    /// The VM.
    pub vm: Vm,
    /// Its vCPU.
    pub vcpu: Vcpu,
}

impl Guest {
    /// Builds the VM and loads `code`.
    pub fn new(kvm: &Kvm, irqchip: bool, code: &[u8]) -> Self {
        Self::build(kvm, irqchip, code, guest_runs_avx(kvm))
    }

    fn build(kvm: &Kvm, irqchip: bool, code: &[u8], runs_avx: bool) -> Self {
        let vm = Vm::new(kvm, &config(irqchip)).unwrap();
        let vcpu = Vcpu::new(vm.fd(), 0, 1, irqchip, kvm.supported_cpuid(), &[]).unwrap();
        for (addr, bytes) in CpuMode::Long.tables() {
            memory::write(vm.memory(), addr, &bytes).unwrap();
        }
        memory::write(vm.memory(), CODE_ADDR, code).unwrap();
        let (mut sregs, mut regs) = (vcpu.sregs().unwrap(), vcpu.regs().unwrap());
        CpuMode::Long.enter(CODE_ADDR, Some(BOOT_STACK_TOP), &mut sregs, &mut regs).unwrap();
        sregs.cr0 = (sregs.cr0 & !CR0_EM) | CR0_MP;
        sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
        let avx = avx_usable(kvm);
        if avx {
            sregs.cr4 |= CR4_OSXSAVE;
        }
        regs.rdi = u64::from(runs_avx);
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&regs).unwrap();
        if avx {
            let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
            xcrs.xcrs[0].value = XCR0_AVX;
            vcpu.set_xcrs(&xcrs).unwrap();
        }
        Self { vm, vcpu }
    }

    /// Runs the guest until a checkpoint (or any other end) and returns why it stopped and what
    /// it reported meanwhile.
    pub fn run(&mut self) -> (ExitReason, Vec<u32>) {
        let control = RunControl::new(vec![Kicker::new(&mut self.vcpu)]);
        let io = TestIo { control: &control, reports: RefCell::default() };
        let reason = run_vcpu(&mut self.vcpu, &io, &control, &mut || None, &mut |_, _| false);
        (reason, io.reports.into_inner())
    }
}

/// Serves the test guests' ports and MMIO, ending the run where they ask.
struct TestIo<'a> {
    control: &'a RunControl,
    reports: RefCell<Vec<u32>>,
}

impl TestIo<'_> {
    fn stop(&self) {
        // The vCPU's own thread asks: no kick needed, the loop sees the flag.
        self.control.request_stop(Some(0), ExitReason::Stopped);
    }
}

impl IoHandler for TestIo<'_> {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> Result<(), IoError> {
        if port != INPUT_PORT {
            return Err(IoError::Unhandled);
        }
        data.copy_from_slice(&PORT_INPUT.to_le_bytes()[..data.len()]);
        self.stop();
        Ok(())
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), IoError> {
        match port {
            CHECKPOINT_PORT => self.stop(),
            REPORT_PORT => {
                let mut word = [0; 4];
                word[..data.len()].copy_from_slice(data);
                self.reports.borrow_mut().push(u32::from_le_bytes(word));
            }
            _ => return Err(IoError::Device(DeviceError::Failed(format!("unexpected write to port {port:#x}")))),
        }
        Ok(())
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), IoError> {
        if addr != INPUT_MMIO {
            return Err(IoError::Unhandled);
        }
        data.copy_from_slice(&MMIO_INPUT.to_le_bytes()[..data.len()]);
        self.stop();
        Ok(())
    }

    fn mmio_write(&self, _: u64, _: &[u8]) -> Result<(), IoError> {
        Err(IoError::Unhandled)
    }
}
