"""Shared fixtures for the kvmkit test suite.

* ``assemble(name, bits=32)`` turns ``tests/guests/<name>.S`` into a flat binary (GNU as +
  objcopy); a guest that includes ``bits.inc`` is assembled for the given mode.
* Tests marked ``kvm`` are skipped with the exact reason ``"no /dev/kvm"`` when /dev/kvm
  does not exist; the ``make_vm``/``boot`` fixtures apply the same gate.
* Tests marked ``hw_kvm`` need a KVM with hardware semantics (a Linux guest to its user space):
  they run on hardware KVM and inside the nested machine (``kvmkit nested``), and are skipped with
  :data:`HW_KVM_SKIP_REASON` on a paravirtualized KVM (``kvm_pvm``). ``scripts/test.sh`` deselects
  them there and runs them in the nested machine instead.
* ``--strict-skips`` makes the session fail when any test was skipped for another reason
  (or for "no /dev/kvm" although /dev/kvm exists), so CI cannot go green by skipping.

* ``--hang-watchdog SECONDS`` (default 120) aborts the run with every thread's traceback
  when a single test hangs, e.g. on a VM that cannot be stopped.

* ``compile_c(name)`` builds the freestanding C guest ``tests/guests/<name>.c`` with the runtime
  in ``tests/guests/c`` (conventions in guest.h); ``run_c_guest(vm, name, arg)`` runs one and
  returns main's return value and its debug text.

Register/port conventions of each guest are on the first line of its .S or .c file. kvmkit is
imported lazily (inside fixtures) so that this file also works in test_strict_skips.py's
subprocess runs, which need neither KVM nor the package. The options are registered here,
so run the suite as ``pytest tests/ [--strict-skips]`` (this conftest must be an initial one).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import sys
from pathlib import Path

import pytest
from support import C_DEBUG_PORT, C_EXIT_PORT, C_STACK_TOP, CImage, build_c_guest, run_build_step

GUEST_DIR = Path(__file__).parent / "guests"
KVM_DEVICE = "/dev/kvm"
KVM_SKIP_REASON = "no /dev/kvm"
HW_KVM_SKIP_REASON = "this KVM is paravirtualized (kvm_pvm); run hw_kvm tests through `kvmkit nested`"
PARAVIRTUAL_KVM = "/sys/module/kvm_pvm"
LOAD_ADDR = 0x1000  # every guest is loaded and entered here
MODE_BITS = {"real": 16, "protected": 32, "long": 64}
# One loadable segment at 1 MiB, where kernels go, with the notes (PVH entry) in another.
KERNEL_LINK_FLAGS = ["-m", "elf_x86_64", "-N", "--no-warn-rwx-segments", "-Ttext=0x100000", "-e", "_start"]
HANG_GUARD = 10.0  # generous bound for runs that should end by themselves
DEFAULT_WATCHDOG = 120.0  # seconds one test may take before the whole run is aborted
BSS_POISON = 0xA5  # fills .bss before a C guest runs, so that start.S must clear it


def have_kvm() -> bool:
    return os.path.exists(KVM_DEVICE)


# --------------------------------------------------------------------------- options/markers


def pytest_addoption(parser):
    parser.addoption(
        "--strict-skips",
        action="store_true",
        default=False,
        help="fail the session if any test is skipped for a reason other than "
        f"'{KVM_SKIP_REASON}' (or for that reason while {KVM_DEVICE} exists)",
    )
    parser.addoption(
        "--hang-watchdog",
        type=float,
        default=DEFAULT_WATCHDOG,
        metavar="SECONDS",
        help="abort the whole run (with every thread's traceback) when one test takes longer "
        f"than this, e.g. a VM that cannot be stopped; 0 disables (default {DEFAULT_WATCHDOG:g})",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "watchdog(seconds): let this test run longer than the default")
    config.addinivalue_line(
        "markers", f"kvm: needs {KVM_DEVICE}; skipped with reason '{KVM_SKIP_REASON}' when it is absent"
    )
    config.addinivalue_line(
        "markers",
        "hw_kvm: needs a KVM with hardware semantics (Linux guests to user space); on a paravirtualized "
        "KVM run it inside the nested machine",
    )
    config.addinivalue_line(
        "markers",
        "standard_kvm: a core test that scripts/test.sh also runs in the nested machine (standard KVM)",
    )
    config.addinivalue_line(
        "markers",
        "hw_debug: needs the debug features only hardware KVM passes to a guest (int3 and data "
        "breakpoints reaching the VMM); scripts/test.sh deselects it on a paravirtualized KVM and in "
        "the nested machine, and runs it on hardware KVM",
    )
    if config.getoption("--strict-skips"):
        config.pluginmanager.register(StrictSkips(), "kvmkit-strict-skips")


def pytest_runtest_setup(item):
    debug = item.get_closest_marker("hw_debug") is not None
    hardware = debug or item.get_closest_marker("hw_kvm") is not None
    if (hardware or item.get_closest_marker("kvm") is not None) and not have_kvm():
        pytest.skip(KVM_SKIP_REASON)
    if hardware and os.path.exists(PARAVIRTUAL_KVM):
        pytest.skip(HW_KVM_SKIP_REASON)
    if debug and os.environ.get("KVMKIT_NESTED"):
        pytest.skip("the nested machine's emulated SVM lets no int3 or data breakpoint out")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # A kvmkit bug that leaves a vCPU unstoppable would hang the run until CI's own limit;
    # the watchdog turns that into a prompt failure that shows where every thread was stuck.
    seconds = item.config.getoption("--hang-watchdog")
    longer = item.get_closest_marker("watchdog")
    if seconds > 0 and longer is not None:
        seconds = max(seconds, float(longer.args[0]))
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True, file=_real_stderr_fd(item.config))
    try:
        return (yield)
    finally:
        if seconds > 0:
            faulthandler.cancel_dump_traceback_later()


def _real_stderr_fd(config) -> int:
    """The terminal's stderr even while pytest captures fd 2 (else the dump would be lost)."""
    capman = config.pluginmanager.get_plugin("capturemanager")
    saved = getattr(getattr(getattr(capman, "_global_capturing", None), "err", None), "targetfd_save", None)
    return saved if isinstance(saved, int) else sys.__stderr__.fileno()


# --------------------------------------------------------------------------- strict skips


class StrictSkips:
    """Records every skip (and xfail) and fails the session on the forbidden ones."""

    def __init__(self):
        self.skips: list[tuple[str, str]] = []
        self.violations: list[tuple[str, str]] = []

    @staticmethod
    def reason(report) -> str:
        if hasattr(report, "wasxfail"):
            return f"xfail: {report.wasxfail}"
        longrepr = report.longrepr
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        prefix = "Skipped: "
        return reason[len(prefix) :] if reason.startswith(prefix) else reason

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            self.skips.append((report.nodeid, self.reason(report)))

    def pytest_collectreport(self, report):
        # module-level pytest.skip(..., allow_module_level=True) / pytest.importorskip
        if report.skipped:
            self.skips.append((report.nodeid, self.reason(report)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        kvm_present = have_kvm()
        self.violations = [
            (nodeid, reason) for nodeid, reason in self.skips if reason != KVM_SKIP_REASON or kvm_present
        ]
        if not self.violations:
            return
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if session.config.pluginmanager.get_plugin("terminalreporter") is None:
            for line in self.lines():
                print(line, file=sys.stderr)

    def pytest_terminal_summary(self, terminalreporter):
        if self.violations:
            terminalreporter.write_sep("=", "--strict-skips: forbidden skips", red=True, bold=True)
            for line in self.lines():
                terminalreporter.write_line(line)

    def lines(self):
        kvm_present = have_kvm()
        for nodeid, reason in self.violations:
            why = f" ({KVM_DEVICE} exists)" if reason == KVM_SKIP_REASON and kvm_present else ""
            yield f"SKIPPED {nodeid}: {reason}{why}"
        yield f"--strict-skips: {len(self.violations)} forbidden skip(s); the session fails"


# --------------------------------------------------------------------------- guests


def _guest_source(name: str, suffix: str, missing_tools: list[str], install: str) -> Path:
    """tests/guests/<name><suffix>, once the tools to build it are known to be there."""
    if missing_tools:
        raise RuntimeError(
            f"cannot build guest {name!r}: {', '.join(missing_tools)} not found on PATH; install {install}"
        )
    src = GUEST_DIR / f"{name}{suffix}"
    if not src.is_file():
        raise FileNotFoundError(f"no guest source {src}")
    return src


@pytest.fixture(scope="session")
def assemble(tmp_path_factory):
    """assemble(name, bits=32, elf=False) -> bytes: tests/guests/<name>.S as a flat binary, or
    with ``elf`` as an ELF executable linked at 1 MiB (a kernel-like image). Cached per session."""
    tools = {tool: shutil.which(tool) for tool in ("as", "objcopy", "ld")}
    missing = [tool for tool, path in tools.items() if path is None]
    outdir = tmp_path_factory.mktemp("guests")
    cache: dict[tuple[str, int, bool], bytes] = {}

    def _assemble(name: str, bits: int = 32, elf: bool = False) -> bytes:
        if (name, bits, elf) in cache:
            return cache[name, bits, elf]
        src = _guest_source(name, ".S", missing, "GNU binutils (e.g. apt-get install binutils)")
        obj, binary = outdir / f"{name}-{bits}.o", outdir / f"{name}-{bits}.{'elf' if elf else 'bin'}"
        # `.code16` / `.code32` in the source (directly or through bits.inc) select the
        # instruction encoding; --64 only chooses the ELF container, which objcopy strips.
        for cmd in (
            [tools["as"], "--64", f"--defsym=BITS={bits}", "-I", str(GUEST_DIR), "-o", str(obj), str(src)],
            [tools["ld"], *KERNEL_LINK_FLAGS, "-o", str(binary), str(obj)]
            if elf
            else [tools["objcopy"], "-O", "binary", "-j", ".text", str(obj), str(binary)],
        ):
            run_build_step(cmd)
        code = binary.read_bytes()
        if not code:
            raise RuntimeError(f"guest {name!r} assembled to an empty binary")
        cache[name, bits, elf] = code
        return code

    return _assemble


# --------------------------------------------------------------------------- VMs


@pytest.fixture
def kvm_available():
    if not have_kvm():
        pytest.skip(KVM_SKIP_REASON)


@pytest.fixture
def make_vm(kvm_available):
    """make_vm(**VM kwargs) -> VM (memory defaults to "2M"); every VM is closed at teardown."""
    import kvmkit

    vms = []

    def _make(**kwargs):
        kwargs.setdefault("memory", "2M")
        vm = kvmkit.VM(**kwargs)
        vms.append(vm)
        return vm

    yield _make

    for vm in vms:
        vm.close()  # stops a VM still running; closing twice is harmless


@pytest.fixture
def boot(make_vm, assemble):
    """boot(guest, mode, cpus=1, regs=None, **VM kwargs) -> VM.

    Writes guest <guest> at LOAD_ADDR, runs setup(mode, entry=LOAD_ADDR) on every vCPU and
    then writes `regs` ({name: value}) into every vCPU. The VM is not started.
    """

    def _boot(guest, mode, *, cpus=1, regs=None, **vm_kwargs):
        vm = make_vm(cpus=cpus, **vm_kwargs)
        vm.mem_write(LOAD_ADDR, assemble(guest, MODE_BITS[mode]))
        for cpu in vm.vcpus:
            cpu.setup(mode, entry=LOAD_ADDR)
            for name, value in (regs or {}).items():
                cpu.reg_write(name, value)
        return vm

    return _boot


@pytest.fixture
def run_halt(kvm_available):
    """run_halt(vm) -> Exit: vm.run() with a hang guard; asserts that the run ended with HLT."""
    from kvmkit import ExitReason

    def _run(vm, timeout=HANG_GUARD):
        exit = vm.run(timeout=timeout)
        assert exit.reason == ExitReason.HLT, f"run ended with {exit.reason} {exit.details}, want HLT"
        return exit

    return _run


class IoLog:
    """Python I/O handler pair that records every access.

    read(addr, size) returns values[size] (or its little-endian bytes when as_bytes);
    write(addr, data) checks that data is bytes and records it.
    """

    def __init__(self, values=None, as_bytes=False):
        self.values = values or {}
        self.as_bytes = as_bytes
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, addr, size):
        self.reads.append((addr, size))
        value = self.values[size]
        return value.to_bytes(size, "little") if self.as_bytes else value

    def write(self, addr, data):
        if not isinstance(data, bytes):
            raise AssertionError(f"write handler got {type(data).__name__}, want bytes")
        self.writes.append((addr, bytes(data)))


@pytest.fixture
def io_log():
    """io_log(values=None, as_bytes=False) -> IoLog."""
    return IoLog


# --------------------------------------------------------------------------- C guests


@pytest.fixture(scope="session")
def compile_c(tmp_path_factory):
    """compile_c(name) -> CImage: tests/guests/<name>.c with the runtime in tests/guests/c
    (start.S, guest.c, virtio.c), linked by guest.ld and flattened. Cached per session."""
    missing = [tool for tool in ("gcc", "objcopy") if shutil.which(tool) is None]
    outdir = tmp_path_factory.mktemp("c-guests")
    cache: dict[str, CImage] = {}

    def _compile(name: str) -> CImage:
        if name not in cache:
            cache[name] = build_c_guest(_guest_source(name, ".c", missing, "gcc and GNU binutils"), outdir)
        return cache[name]

    return _compile


@pytest.fixture
def run_c_guest(compile_c, kvm_available):
    """run_c_guest(vm, name, arg=0, timeout=HANG_GUARD) -> (exit_code, debug_text).

    Loads C guest <name> into `vm` (whose RAM must reach the guest's end), enters it in long
    mode on vCPU 0 with RSP = C_STACK_TOP and RDI = arg, serves the exit and debug ports and
    runs it until it reports its exit code (the VM is then stopped). exit_code is main's return
    value (or fail's code) as a C int. Asserts that the run ended with exactly one exit report,
    showing the debug text otherwise."""
    from kvmkit import ExitReason
    from kvmkit.errors import KvmkitError

    def _run(vm, name: str, arg: int = 0, timeout: float = HANG_GUARD) -> tuple[int, str]:
        guest = compile_c(name)
        ram_end = max(addr + size for addr, size in vm.memory_regions if addr < 1 << 32)
        assert guest.end <= ram_end, f"C guest {name!r} needs RAM up to {guest.end:#x}, VM has {ram_end:#x}"
        vm.mem_write(guest.load_addr, guest.image)
        image_end = guest.load_addr + len(guest.image)
        vm.mem_write(image_end, bytes([BSS_POISON]) * (guest.end - image_end))

        codes: list[int] = []
        debug = bytearray()

        def on_exit(_port, data):
            codes.append(int.from_bytes(data, "little", signed=True))
            # With an in-kernel irqchip KVM keeps the guest's final HLT to itself, so the run
            # ends here rather than at the HLT.
            vm.stop()

        for port in (C_EXIT_PORT, C_DEBUG_PORT):  # hooked by an earlier run of the same VM
            with contextlib.suppress(KvmkitError):
                vm.unhook_io(port)
        vm.hook_io(C_EXIT_PORT, size=4, write=on_exit)
        vm.hook_io(C_DEBUG_PORT, write=lambda _port, data: debug.extend(data))
        cpu = vm.vcpus[0]
        cpu.reg_write("rdi", arg)
        cpu.setup("long", entry=guest.entry, stack=C_STACK_TOP)

        exit = vm.run(timeout=timeout)
        text = debug.decode(errors="replace")
        assert exit.reason is ExitReason.STOPPED and len(codes) == 1, (
            f"C guest {name!r} run ended with {exit.reason} {exit.details} after exit codes {codes}, "
            f"want one exit code; debug text:\n{text}"
        )
        return codes[0], text

    return _run
