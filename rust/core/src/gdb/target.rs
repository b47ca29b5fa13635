//! One gdb session's view of the machine: registers, memory, threads (one per vCPU), breakpoints
//! and watchpoints, and how the VM runs and stops under the client's control.

use std::io::Read;
use std::net::TcpStream;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::reverse_exec::{
    ReplayLogPosition, ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint,
    SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};

use super::regs::{KvmX86_64, X86Registers};
use super::replay::{self, Journal};
use super::{BreakpointMode, Shared};
use crate::arch::x86_64::pagewalk;
use crate::machine::Machine;
use crate::vstate::debug::{DebugKind, HwKind, HwSlot, HW_SLOTS};
use crate::vstate::exit::{Exit, ExitReason};

/// `int3`.
const INT3: u8 = 0xcc;
/// How often a running VM's session looks at the connection and the server's shutdown.
const POLL: Duration = Duration::from_millis(20);

/// What the client asked the next resume to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Run every vCPU.
    Continue,
    /// Run one instruction of this vCPU, the others staying where they are.
    Step(usize),
    /// Go back one instruction (reverse execution).
    ReverseStep,
    /// Go back to the last breakpoint or watchpoint hit, or to where recording began.
    ReverseContinue,
}

/// How a breakpoint or watchpoint the client set is carried out.
#[derive(Debug, Clone, Copy)]
enum How {
    /// In the debug registers whose bits are set (a watchpoint on an unaligned range or one
    /// longer than 8 bytes takes several).
    Slots(u8),
    /// By an `int3` over the byte at guest-physical `physical`, which held `original`.
    Int3 { physical: u64, original: u8 },
    /// By comparing RIP after each single step, as a recording session runs: memory and debug
    /// registers stay untouched, so restoring a recorded state cannot bring back stale `int3`s.
    Compared,
}

/// A breakpoint or watchpoint the client set, as its Z packet gave it.
#[derive(Debug, Clone, Copy)]
struct Point {
    /// The Z packet's type: 0 software breakpoint, 1 hardware breakpoint, 2-4 watchpoints.
    z: u8,
    addr: u64,
    len: u64,
    how: How,
}

/// The target a session drives.
pub(super) struct Session {
    machine: Arc<Machine>,
    shared: Arc<Shared>,
    mode: BreakpointMode,
    points: Vec<Point>,
    /// Whether `int3` exiting was on before the session set its first `int3`.
    int3_before: Option<bool>,
    step: Option<usize>,
    pending: Option<Resume>,
    /// Whether a run the session started is in progress.
    running: bool,
    /// Whether the VM ended for good (every vCPU halted, powered off).
    pub(super) exited: bool,
    /// Whether [`clean_up`](Self::clean_up) ran.
    cleaned: bool,
    /// Whether the session records for reverse execution (asked for, and one vCPU).
    reverse: bool,
    /// What the recording holds; `None` until the first instruction runs, and again after the
    /// client changes registers or memory.
    journal: Option<Journal>,
}

/// Why a session ends on the server's side.
#[derive(Debug)]
pub(super) enum SessionError {
    /// The server is closing.
    Shutdown,
    /// The machine failed to run.
    Machine(crate::Error),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shutdown => f.write_str("the gdb server is closing"),
            Self::Machine(e) => write!(f, "{e}"),
        }
    }
}

fn tid(index: usize) -> Tid {
    NonZeroUsize::new(index + 1).expect("index + 1 is not zero")
}

impl Session {
    pub(super) fn new(machine: Arc<Machine>, shared: Arc<Shared>) -> Self {
        let mode = shared.mode;
        let reverse = shared.reverse && machine.vcpu_count() == 1;
        Self {
            machine,
            shared,
            mode,
            points: Vec::new(),
            int3_before: None,
            step: None,
            pending: None,
            running: false,
            exited: false,
            cleaned: false,
            reverse,
            journal: None,
        }
    }

    /// Whether a run the session started is in progress.
    pub(super) fn is_running(&self) -> bool {
        self.running
    }

    /// The vCPU behind a thread id (vCPU 0 for one that is not there).
    fn index(&self, tid: Tid) -> usize {
        let index = tid.get() - 1;
        if index < self.machine.vcpu_count() {
            index
        } else {
            0
        }
    }

    /// Stops a run the session started and waits for its vCPUs.
    fn halt(&mut self) -> Option<Exit> {
        let ours = std::mem::replace(&mut self.running, false);
        if self.machine.is_running() {
            self.machine.stop(ExitReason::Stopped);
            return self.machine.wait(None).ok().flatten();
        }
        // It may have ended by itself just now.
        ours.then(|| self.machine.last_exit()).flatten()
    }

    /// Ends the session's hold on the machine: stops a run in progress and takes away every
    /// breakpoint and watchpoint the client left.
    pub(super) fn clean_up(&mut self) {
        self.cleaned = true;
        self.halt();
        for point in std::mem::take(&mut self.points) {
            self.undo(point);
        }
        if let Some(before) = self.int3_before.take() {
            let _ = self.machine.set_software_breakpoints(before);
        }
    }

    fn undo(&mut self, point: Point) {
        let result = match point.how {
            How::Slots(mask) => self.free_slots(mask),
            How::Int3 { physical, original } => self.machine.write_memory(physical, &[original]),
            How::Compared => Ok(()),
        };
        if let Err(e) = result {
            log::warn!("gdb: cannot remove the breakpoint at {:#x}: {e}", point.addr);
        }
    }

    fn add_point(&mut self, z: u8, addr: u64, len: u64, slots: &[HwSlot]) -> TargetResult<bool, Self> {
        let how = match (z, self.mode) {
            (0 | 1, _) if self.reverse => How::Compared,
            (0, BreakpointMode::Software) => self.add_int3(addr)?,
            (0, BreakpointMode::Auto) => match self.take_slots(slots) {
                Ok(mask) => How::Slots(mask),
                Err(_) => self.add_int3(addr)?,
            },
            _ => match self.take_slots(slots) {
                Ok(mask) => How::Slots(mask),
                Err(e) => {
                    log::info!("gdb: not enough debug registers for {addr:#x}: {e}");
                    return Ok(false);
                }
            },
        };
        self.points.push(Point { z, addr, len, how });
        Ok(true)
    }

    /// Puts `slots` in debug registers, all or none; the mask of the registers taken.
    fn take_slots(&mut self, slots: &[HwSlot]) -> crate::Result<u8> {
        let mut mask = 0;
        for &slot in slots {
            match self.machine.add_hw_slot(slot) {
                Ok(index) => mask |= 1 << index,
                Err(e) => {
                    let _ = self.free_slots(mask);
                    return Err(e);
                }
            }
        }
        Ok(mask)
    }

    fn free_slots(&mut self, mask: u8) -> crate::Result<()> {
        (0..HW_SLOTS).filter(|i| mask & 1 << i != 0).try_for_each(|i| self.machine.remove_hw_slot(i))
    }

    fn add_int3(&mut self, addr: u64) -> TargetResult<How, Self> {
        let physical = self.machine.translate(0, addr).map_err(|_| TargetError::NonFatal)?;
        let physical = physical.ok_or(TargetError::Errno(14))?;
        if self.int3_before.is_none() {
            self.int3_before = Some(self.machine.software_breakpoints());
            self.machine.set_software_breakpoints(true).map_err(|_| TargetError::NonFatal)?;
        }
        let mut original = [0];
        self.machine.read_memory(physical, &mut original).map_err(|_| TargetError::Errno(14))?;
        self.machine.write_memory(physical, &[INT3]).map_err(|_| TargetError::Errno(14))?;
        Ok(How::Int3 { physical, original: original[0] })
    }

    fn remove_point(&mut self, z: u8, addr: u64, len: u64) -> TargetResult<bool, Self> {
        let Some(at) = self.points.iter().position(|p| (p.z, p.addr, p.len) == (z, addr, len)) else {
            return Ok(false);
        };
        let point = self.points.remove(at);
        self.undo(point);
        Ok(true)
    }

    /// The `int3`s the session set inside guest-physical `[physical, physical + len)`.
    fn int3s_in(&self, physical: u64, len: usize) -> impl Iterator<Item = (usize, u8)> + '_ {
        self.points.iter().filter_map(move |p| match p.how {
            How::Int3 { physical: at, original } if at >= physical && at - physical < len as u64 => {
                Some(((at - physical) as usize, original))
            }
            _ => None,
        })
    }

    /// What the client hears of how a run or step ended.
    fn stop_reason(&mut self, exit: &Exit, stepping: Option<usize>) -> MultiThreadStopReason<u64> {
        let index = exit.vcpu.map_or(stepping.unwrap_or(0), |v| v as usize);
        let thread = tid(index);
        let trap = MultiThreadStopReason::SignalWithThread { tid: thread, signal: Signal::SIGTRAP };
        let signal = |signal| MultiThreadStopReason::SignalWithThread { tid: thread, signal };
        match &exit.reason {
            ExitReason::Debug(event) => match event.kind {
                DebugKind::Step => trap,
                DebugKind::Hardware(slot) => {
                    let slot = usize::from(slot);
                    match self.points.iter().find(|p| matches!(p.how, How::Slots(mask) if mask & 1 << slot != 0)) {
                        Some(Point { z: 0, .. }) => MultiThreadStopReason::SwBreak(thread),
                        Some(Point { z: 1, .. }) => MultiThreadStopReason::HwBreak(thread),
                        Some(&Point { z, addr, .. }) => {
                            let kind = match z {
                                2 => WatchKind::Write,
                                3 => WatchKind::Read,
                                _ => WatchKind::ReadWrite,
                            };
                            MultiThreadStopReason::Watch { tid: thread, kind, addr }
                        }
                        None => trap,
                    }
                }
                DebugKind::Software => {
                    let ours = self.points.iter().any(|p| p.z == 0 && p.addr == event.pc);
                    if ours {
                        MultiThreadStopReason::SwBreak(thread)
                    } else {
                        trap
                    }
                }
            },
            // Stepping over a HLT may end as the halt.
            ExitReason::Hlt if stepping.is_some() => trap,
            // Without an irqchip, nothing wakes a VM all of whose vCPUs halted.
            ExitReason::Hlt | ExitReason::PowerOff => {
                self.exited = true;
                MultiThreadStopReason::Exited(0)
            }
            ExitReason::Stopped | ExitReason::Timeout | ExitReason::Paused => signal(Signal::SIGINT),
            ExitReason::Shutdown => signal(Signal::SIGSEGV),
            // A guest exception, as a Unix kernel would signal it: divide errors and x87/SIMD
            // faults as SIGFPE, invalid opcodes as SIGILL, breakpoints and debug traps as
            // SIGTRAP, the rest (page and protection faults above all) as SIGSEGV.
            ExitReason::GuestFault(fault) => match fault.vector {
                0 | 16 | 19 => signal(Signal::SIGFPE),
                6 => signal(Signal::SIGILL),
                1 | 3 => trap,
                _ => signal(Signal::SIGSEGV),
            },
            ExitReason::UnhandledIo { .. } | ExitReason::DeviceError { .. } => signal(Signal::SIGBUS),
            ExitReason::InternalError(_) | ExitReason::FailEntry { .. } => signal(Signal::SIGILL),
            ExitReason::Reset | ExitReason::Crash | ExitReason::VmmError(_) => signal(Signal::SIGABRT),
        }
    }
}

impl Drop for Session {
    /// A session that did not end normally (a panic in the protocol code) still takes its
    /// breakpoints away.
    fn drop(&mut self) {
        if !self.cleaned {
            self.clean_up();
        }
    }
}

impl Target for Session {
    type Arch = KvmX86_64;
    type Error = SessionError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for Session {
    fn read_registers(&mut self, regs: &mut X86Registers, tid: Tid) -> TargetResult<(), Self> {
        let state = self.machine.with_vcpu(self.index(tid), |v| Ok((v.regs()?, v.sregs()?, v.fpu()?)));
        let (r, s, f) = state.map_err(|_| TargetError::NonFatal)?;
        *regs = X86Registers::from_kvm(&r, &s, &f);
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86Registers, tid: Tid) -> TargetResult<(), Self> {
        let written = self.machine.with_vcpu(self.index(tid), |v| {
            let (mut r, mut s, mut f) = (v.regs()?, v.sregs()?, v.fpu()?);
            regs.to_kvm(&mut r, &mut s, &mut f);
            v.set_sregs(&s)?;
            v.set_regs(&r)?;
            v.set_fpu(&f)
        });
        // A recording cannot replay past a change the guest did not make.
        self.journal = None;
        written.map_err(|_| TargetError::NonFatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let index = self.index(tid);
        // Page by page, as far as the pages are mapped.
        let mut done = 0;
        while done < data.len() {
            let at = start.wrapping_add(done as u64);
            let size = (pagewalk::page_rest(at) as usize).min(data.len() - done);
            let Ok(Some(physical)) = self.machine.translate(index, at) else { break };
            let piece = &mut data[done..done + size];
            if self.machine.read_memory(physical, piece).is_err() {
                break;
            }
            for (offset, original) in self.int3s_in(physical, size) {
                piece[offset] = original;
            }
            done += size;
        }
        if done == 0 && !data.is_empty() {
            return Err(TargetError::Errno(14));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let index = self.index(tid);
        self.journal = None;
        self.machine.write_virtual(index, start, data).map_err(|_| TargetError::Errno(14))?;
        // Bytes written under an int3 become its original; the int3 stays.
        let mut rewrite = Vec::new();
        for point in &mut self.points {
            if let How::Int3 { physical, original } = &mut point.how {
                let offset = point.addr.wrapping_sub(start);
                if offset < data.len() as u64 {
                    *original = data[offset as usize];
                    rewrite.push(*physical);
                }
            }
        }
        for physical in rewrite {
            self.machine.write_memory(physical, &[INT3]).map_err(|_| TargetError::Errno(14))?;
        }
        Ok(())
    }

    fn list_active_threads(&mut self, thread_is_active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        (0..self.machine.vcpu_count()).for_each(|index| thread_is_active(tid(index)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl ReverseStep<Tid> for Session {
    fn reverse_step(&mut self, _tid: Tid) -> Result<(), Self::Error> {
        self.pending = Some(Resume::ReverseStep);
        Ok(())
    }
}

impl ReverseCont<Tid> for Session {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.pending = Some(Resume::ReverseContinue);
        Ok(())
    }
}

type Stop = MultiThreadStopReason<u64>;

/// Recording and reverse execution (see [`replay`](super::replay)).
impl Session {
    /// Runs one instruction, recording it.
    fn recorded_step(&mut self, interrupted: &mut dyn FnMut() -> bool) -> crate::Result<Exit> {
        if self.journal.is_none() {
            self.journal = Some(Journal::start(&self.machine)?);
        }
        let exit = replay::step(&self.machine, interrupted)?;
        match &mut self.journal {
            Some(journal) if replay::ran_instruction(&exit) => journal.record(),
            // Nothing ran.
            _ if exit.reason == ExitReason::Stopped => {}
            _ => self.journal = None,
        }
        Ok(exit)
    }

    /// Runs until a breakpoint, a watchpoint or another stop, one recorded step at a time;
    /// Ctrl-C (looked for every few hundred steps) stops it.
    fn recorded_continue(&mut self, conn: &TcpStream) -> crate::Result<Stop> {
        let cs_base = self.code_base()?;
        for count in 0u64.. {
            if count % 256 == 255 && (self.shared.closing() || take_interrupt(conn)) {
                return Ok(MultiThreadStopReason::SignalWithThread { tid: tid(0), signal: Signal::SIGINT });
            }
            let exit = self.recorded_step(&mut || false)?;
            if !matches!(&exit.reason, ExitReason::Debug(event) if event.kind == DebugKind::Step) {
                return Ok(self.stop_reason(&exit, None));
            }
            if let Some(stop) = self.breakpoint_at(self.machine.regs(0)?.rip.wrapping_add(cs_base)) {
                return Ok(stop);
            }
        }
        unreachable!("the loop returns")
    }

    /// Goes back one instruction, or says the recording begins here.
    fn reverse_step_now(&mut self) -> crate::Result<Stop> {
        let Some(journal) = self.journal.as_mut().filter(|journal| journal.steps() > 0) else {
            return Ok(MultiThreadStopReason::ReplayLog { tid: Some(tid(0)), pos: ReplayLogPosition::Begin });
        };
        let target = journal.steps() - 1;
        journal.replay(&self.machine, target, |_, _| {})?;
        Ok(MultiThreadStopReason::SignalWithThread { tid: tid(0), signal: Signal::SIGTRAP })
    }

    /// Goes back to the last breakpoint or watchpoint hit before here, or to where the recording
    /// begins: one replay to find it, a second to stop there.
    fn reverse_continue_now(&mut self) -> crate::Result<Stop> {
        let begin = MultiThreadStopReason::ReplayLog { tid: Some(tid(0)), pos: ReplayLogPosition::Begin };
        let Some(mut journal) = self.journal.take().filter(|journal| journal.steps() > 0) else {
            return Ok(begin);
        };
        let (cs_base, here) = (self.code_base()?, journal.steps());
        let mut last = None;
        let found = journal.replay(&self.machine, here - 1, |at, exit| {
            let rip = self.machine.regs(0).map(|regs| regs.rip.wrapping_add(cs_base));
            if let Some(stop) = self.watch_hit(exit).or_else(|| rip.ok().and_then(|rip| self.breakpoint_at(rip))) {
                last = Some((at, stop));
            }
        });
        let outcome = found.and_then(|()| match last {
            Some((at, stop)) => {
                if at != here - 1 {
                    journal.replay(&self.machine, at, |_, _| {})?;
                }
                Ok(stop)
            }
            None => journal.replay(&self.machine, 0, |_, _| {}).map(|()| begin),
        });
        self.journal = Some(journal);
        outcome
    }

    /// The breakpoint the client set at `rip`, as its stop.
    fn breakpoint_at(&self, rip: u64) -> Option<Stop> {
        let point = self.points.iter().find(|point| point.z <= 1 && point.addr == rip)?;
        Some(if point.z == 0 { MultiThreadStopReason::SwBreak(tid(0)) } else { MultiThreadStopReason::HwBreak(tid(0)) })
    }

    /// The watchpoint a step's exit reports, as its stop.
    fn watch_hit(&self, exit: &Exit) -> Option<Stop> {
        let ExitReason::Debug(event) = &exit.reason else { return None };
        let DebugKind::Hardware(slot) = event.kind else { return None };
        let point =
            self.points.iter().find(|p| p.z >= 2 && matches!(p.how, How::Slots(mask) if mask & 1 << slot != 0))?;
        let kind = match point.z {
            2 => WatchKind::Write,
            3 => WatchKind::Read,
            _ => WatchKind::ReadWrite,
        };
        Some(MultiThreadStopReason::Watch { tid: tid(0), kind, addr: point.addr })
    }

    /// The base of vCPU 0's code segment, which turns RIP into the linear address breakpoints
    /// are set at (none in 64-bit code).
    fn code_base(&self) -> crate::Result<u64> {
        let sregs = self.machine.sregs(0)?;
        Ok(if sregs.cs.l != 0 { 0 } else { sregs.cs.base })
    }
}

impl ThreadExtraInfo for Session {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = format!("vCPU {}", tid.get() - 1);
        let len = text.len().min(buf.len());
        buf[..len].copy_from_slice(&text.as_bytes()[..len]);
        Ok(len)
    }
}

impl MultiThreadResume for Session {
    fn resume(&mut self) -> Result<(), Self::Error> {
        self.pending = Some(self.step.take().map_or(Resume::Continue, Resume::Step));
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.step = None;
        Ok(())
    }

    fn set_resume_action_continue(&mut self, _tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, Tid, Self>> {
        if self.reverse {
            Some(self)
        } else {
            None
        }
    }

    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, Tid, Self>> {
        if self.reverse {
            Some(self)
        } else {
            None
        }
    }
}

impl MultiThreadSchedulerLocking for Session {
    /// A step runs only its vCPU anyway; a continue runs every vCPU, as the machine only runs
    /// all of them or one for a step.
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl MultiThreadSingleStep for Session {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.step = Some(self.index(tid));
        Ok(())
    }
}

impl Breakpoints for Session {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for Session {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.add_point(0, addr, 1, &[HwSlot::breakpoint(addr)])
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.remove_point(0, addr, 1)
    }
}

impl HwBreakpoint for Session {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.add_point(1, addr, 1, &[HwSlot::breakpoint(addr)])
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.remove_point(1, addr, 1)
    }
}

/// `[addr, addr + len)` cut into the aligned 1, 2, 4 and 8-byte pieces debug registers watch, if
/// it takes no more pieces than there are registers.
fn aligned_pieces(addr: u64, len: u64) -> Option<Vec<(u64, u8)>> {
    let end = addr.checked_add(len)?;
    let mut pieces = Vec::new();
    let mut at = addr;
    while at < end {
        let size = [8, 4, 2, 1].into_iter().find(|&size| at % size == 0 && end - at >= size)?;
        pieces.push((at, size as u8));
        if pieces.len() > HW_SLOTS {
            return None;
        }
        at += size;
    }
    (!pieces.is_empty()).then_some(pieces)
}

fn z_of(kind: WatchKind) -> u8 {
    match kind {
        WatchKind::Write => 2,
        WatchKind::Read => 3,
        WatchKind::ReadWrite => 4,
    }
}

impl HwWatchpoint for Session {
    fn add_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        // x86 has no read-only watchpoints: reads are caught together with writes.
        let access = if kind == WatchKind::Write { HwKind::Write } else { HwKind::ReadWrite };
        let Some(pieces) = aligned_pieces(addr, len) else { return Ok(false) };
        let slots: Option<Vec<HwSlot>> =
            pieces.into_iter().map(|(at, size)| HwSlot::watchpoint(at, size, access).ok()).collect();
        let Some(slots) = slots else { return Ok(false) };
        self.add_point(z_of(kind), addr, len, &slots)
    }

    fn remove_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        self.remove_point(z_of(kind), addr, len)
    }
}

/// Whether the connection has something to read (or was closed) within `timeout`.
fn readable(conn: &TcpStream, timeout: Duration) -> bool {
    super::wait_readable(conn.as_raw_fd(), timeout)
}

/// Whether a step should end early: a Ctrl-C (0x03, taken off the connection) came next, or the
/// client has gone.
fn take_interrupt(conn: &TcpStream) -> bool {
    let mut byte = [0];
    if !readable(conn, Duration::ZERO) {
        return false;
    }
    match conn.peek(&mut byte) {
        Ok(1) if byte[0] == 0x03 => {
            let mut reader = conn;
            let _ = reader.read(&mut byte);
            true
        }
        Ok(1) => false,
        // The end of the connection, or a broken one.
        _ => true,
    }
}

/// Runs the target between the client's resume and the stop it is told of.
pub(super) enum EventLoop {}

type WaitResult =
    Result<Event<MultiThreadStopReason<u64>>, WaitForStopReasonError<SessionError, <TcpStream as Connection>::Error>>;

impl BlockingEventLoop for EventLoop {
    type Target = Session;
    type Connection = TcpStream;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(target: &mut Session, conn: &mut TcpStream) -> WaitResult {
        let shared = target.shared.clone();
        let shared_for_steps = shared.clone();
        let recorded = |target: &mut Session, conn: &TcpStream, resume| {
            let mut interrupted = || shared_for_steps.closing() || take_interrupt(conn);
            let stop = match resume {
                Resume::Step(_) => {
                    target.recorded_step(&mut interrupted).map(|exit| target.stop_reason(&exit, Some(0)))
                }
                Resume::Continue => target.recorded_continue(conn),
                Resume::ReverseStep => target.reverse_step_now(),
                Resume::ReverseContinue => target.reverse_continue_now(),
            };
            stop.map(Event::TargetStopped).map_err(|e| WaitForStopReasonError::Target(SessionError::Machine(e)))
        };
        match target.pending.take() {
            Some(resume @ (Resume::ReverseStep | Resume::ReverseContinue)) => return recorded(target, conn, resume),
            Some(resume) if target.reverse => return recorded(target, conn, resume),
            Some(Resume::Step(index)) => {
                let mut interrupted = || shared.closing() || take_interrupt(conn);
                let exit = target
                    .machine
                    .step(index, true, &mut interrupted)
                    .map_err(|e| WaitForStopReasonError::Target(SessionError::Machine(e)))?;
                return Ok(Event::TargetStopped(target.stop_reason(&exit, Some(index))));
            }
            Some(Resume::Continue) => {
                target.machine.start().map_err(|e| WaitForStopReasonError::Target(SessionError::Machine(e)))?;
                target.running = true;
            }
            None => {}
        }
        loop {
            if shared.closing() {
                target.halt();
                return Err(WaitForStopReasonError::Target(SessionError::Shutdown));
            }
            if target.running {
                match target.machine.wait(Some(Duration::ZERO)) {
                    Ok(Some(exit)) => {
                        target.running = false;
                        return Ok(Event::TargetStopped(target.stop_reason(&exit, None)));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(WaitForStopReasonError::Target(SessionError::Machine(e))),
                }
            }
            if readable(conn, POLL) {
                return ConnectionExt::read(conn).map(Event::IncomingData).map_err(WaitForStopReasonError::Connection);
            }
        }
    }

    fn on_interrupt(target: &mut Session) -> Result<Option<MultiThreadStopReason<u64>>, SessionError> {
        if !target.running {
            return Ok(None);
        }
        let exit = target.halt();
        Ok(exit.map(|exit| target.stop_reason(&exit, None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_ranges_are_cut_into_aligned_pieces() {
        assert_eq!(aligned_pieces(0x1000, 8), Some(vec![(0x1000, 8)]));
        assert_eq!(aligned_pieces(0x1003, 4), Some(vec![(0x1003, 1), (0x1004, 2), (0x1006, 1)]));
        assert_eq!(aligned_pieces(0x1000, 16), Some(vec![(0x1000, 8), (0x1008, 8)]));
        assert_eq!(aligned_pieces(0x1000, 40), None, "more than four registers");
        assert_eq!(aligned_pieces(0x1000, 0), None);
        assert_eq!(aligned_pieces(u64::MAX, 2), None);
    }
}
