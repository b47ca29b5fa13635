"""The gdb server: Debian's gdb in batch mode against a C guest with symbols (breakpoints,
registers, single-step, memory, threads, watchpoints, variables), and a raw protocol client for
Ctrl-C, detaching, garbage and clients that vanish."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from kvmkit import ExitReason
from support import C_FLAGS, C_RUNTIME, C_RUNTIME_DIR, C_STACK_TOP, GdbRemote, elf_layout, run_build_step

pytestmark = [pytest.mark.kvm]

GUEST_SOURCE = Path(__file__).parent / "guests" / "gdb_target.c"
EXIT_PORT = 0x600
DEBUG_PORT = 0x604
REPORT_PORT = 0x610
SECONDARY_STACK = 0x70000
MARKER = 0x1234
HANG_GUARD = 10.0
GDB_TIMEOUT = 60.0


@dataclass(frozen=True)
class GdbGuest:
    """gdb_target.c linked with debug info: the ELF for gdb, the flat image for the VM."""

    elf: Path
    image: bytes
    load_addr: int
    entry: int
    symbols: dict[str, tuple[int, int]]  # name -> (address, size)

    def address(self, name: str) -> int:
        return self.symbols[name][0]

    def inside(self, name: str, addr: int) -> bool:
        start, size = self.symbols[name]
        return start <= addr < start + size


@pytest.fixture(scope="session")
def gdb() -> str:
    """Debian's gdb, installed when missing."""
    path = shutil.which("gdb")
    if path is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "gdb"],
            check=True,
            capture_output=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        path = shutil.which("gdb")
    assert path is not None, "gdb is needed (apt-get install gdb)"
    return path


@pytest.fixture(scope="session")
def gdb_guest(tmp_path_factory) -> GdbGuest:
    outdir = tmp_path_factory.mktemp("gdb-guest")
    elf, flat = outdir / "gdb_target.elf", outdir / "gdb_target.bin"
    runtime = [C_RUNTIME_DIR / part for part in C_RUNTIME]
    script = C_RUNTIME_DIR / "guest.ld"
    # With debug information (-g), for gdb to know the variables and lines.
    compile_cmd = ["gcc", *C_FLAGS, "-g", "-I", C_RUNTIME_DIR, "-T", script, "-o", elf, GUEST_SOURCE]
    run_build_step([*compile_cmd, *runtime])
    run_build_step(["objcopy", "-O", "binary", elf, flat])
    entry, start, _ = elf_layout(elf.read_bytes())
    listing = subprocess.run(["nm", "-S", str(elf)], check=True, capture_output=True, text=True).stdout
    symbols = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 4:
            symbols[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
    return GdbGuest(elf, flat.read_bytes(), start, entry, symbols)


def le(data: bytes) -> int:
    return int.from_bytes(data, "little")


@dataclass
class Reports:
    exit_codes: list[int]
    reports: list[int]


@pytest.fixture
def guest_vm(make_vm, gdb_guest):
    """guest_vm(cpus=1, arg=0) -> (VM, Reports): the guest loaded, vCPU 0 at its entry and the
    others in secondary(), its ports served from Python. Not started."""

    def _make(cpus: int = 1, arg: int = 0):
        vm = make_vm(memory="4M", cpus=cpus)
        vm.mem_write(gdb_guest.load_addr, gdb_guest.image)
        seen = Reports([], [])
        vm.hook_io(EXIT_PORT, size=4, write=lambda _p, data: seen.exit_codes.append(le(data)))
        vm.hook_io(REPORT_PORT, size=4, write=lambda _p, data: seen.reports.append(le(data)))
        vm.hook_io(DEBUG_PORT, write=lambda _p, _data: None)
        vm.vcpus[0].reg_write("rdi", arg)
        vm.vcpus[0].setup("long", entry=gdb_guest.entry, stack=C_STACK_TOP)
        for cpu in vm.vcpus[1:]:
            cpu.setup("long", entry=gdb_guest.address("secondary"), stack=SECONDARY_STACK)
        return vm, seen

    return _make


def run_gdb(gdb: str, guest: GdbGuest, port: int, *commands: str) -> dict[str, str]:
    """Runs gdb in batch mode on the guest's ELF, attached to the server: each command's output,
    by command (the first output of a command given twice, `name#2` for the second...)."""
    args = [gdb, "-batch", "-nx", "-ex", "set pagination off", "-ex", f"target remote 127.0.0.1:{port}"]
    names = []
    for command in commands:
        name = command
        n = 2
        while name in names:
            name = f"{command}#{n}"
            n += 1
        names.append(name)
        args += ["-ex", f"echo <<{len(names) - 1}>>\\n", "-ex", command]
    args += ["-ex", f"echo <<{len(names)}>>\\n", str(guest.elf)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=GDB_TIMEOUT)
    text = proc.stdout + proc.stderr
    sections = {}
    for i, name in enumerate(names):
        start, end = f"<<{i}>>\n", f"<<{i + 1}>>\n"
        assert start in text and end in text, f"gdb did not get through {name!r}:\n{text}"
        sections[name] = text[text.index(start) + len(start) : text.index(end)]
    sections["all"] = text
    return sections


@pytest.fixture
def debug_with_gdb(gdb, gdb_guest):
    """debug_with_gdb(vm, *commands, **serve) -> (server, output): the VM served to gdb (`serve`:
    serve_gdb's keyword arguments), and run_gdb's output for the commands."""

    def _debug(vm, *commands: str, **serve):
        server = vm.serve_gdb("127.0.0.1:0", **serve)
        return server, run_gdb(gdb, gdb_guest, server.port, *commands)

    return _debug


def assert_ran_to_end(out: dict[str, str], last: str, server, seen: Reports, marker: int) -> None:
    """After gdb's command `last` the guest ran to its end and gdb detached: one run of the guest,
    which reported `marker`."""
    assert "exited normally" in out[last], out["all"]
    assert server.wait_detached(HANG_GUARD)
    assert (seen.reports, seen.exit_codes) == ([marker], [10])


def hex_words(text: str) -> list[int]:
    return [int(word, 16) for word in re.findall(r"\b0x[0-9a-f]{16}\b", text)]


def test_gdb_breaks_steps_reads_and_writes(gdb_guest, guest_vm, debug_with_gdb):
    vm, seen = guest_vm(cpus=2)
    server, out = debug_with_gdb(
        vm,
        "break tick",
        "continue",
        "info registers",
        "p/x $pc",
        "stepi",
        "p/x $pc",
        "x/4gx $rsp",
        "info threads",
        "p/x counter",
        "set var marker = 0x5678",
        "delete",
        "continue",
    )
    everything = out["all"]
    assert "Breakpoint 1, " in out["continue"] and "tick" in out["continue"], everything

    # Registers: the general ones, segment bases, control registers and EFER.
    regs = {m[0]: int(m[1], 16) for m in re.findall(r"^(\w+)\s+(0x[0-9a-f]+)", out["info registers"], re.M)}
    for name in ("rax", "rsp", "rip", "eflags", "cs", "ss", "fs_base", "gs_base", "cr0", "cr3", "cr4"):
        assert name in regs, f"{name} missing from info registers:\n{out['info registers']}"
    assert "efer" in regs
    assert regs["rip"] == gdb_guest.address("tick")
    assert regs["rdi"] == 1, "tick(1) is the first call"
    assert regs["cr0"] & 0x8000_0001 == 0x8000_0001, "protected mode with paging"
    assert regs["efer"] & 0x500 == 0x500, "long mode enabled and active"
    assert regs["cr4"] & 0x20, "PAE"

    # stepi moves one instruction within tick.
    before = int(out["p/x $pc"].split("=")[1], 16)
    after = int(out["p/x $pc#2"].split("=")[1], 16)
    assert before == gdb_guest.address("tick")
    assert after != before and gdb_guest.inside("tick", after)

    # The stack by virtual address: tick's return address into main is on top.
    words = hex_words(out["x/4gx $rsp"])
    assert len(words) == 4, out["x/4gx $rsp"]
    assert gdb_guest.inside("main", words[0]), f"{words[0]:#x} is not in main"

    # Two vCPUs, two threads.
    threads = out["info threads"]
    assert "vCPU 0" in threads and "vCPU 1" in threads, threads
    assert "secondary" in threads and "tick" in threads, threads
    assert "= 0x0" in out["p/x counter"]

    # The variable gdb changed is what the guest reports; the run ends with every vCPU halted.
    assert_ran_to_end(out, "continue#2", server, seen, 0x5678)
    assert vm.mem_read(gdb_guest.address("marker"), 8) == (0x5678).to_bytes(8, "little")
    assert vm.wait(HANG_GUARD).reason is ExitReason.HLT
    assert not server.attached and server.sessions == 1
    server.close()


@pytest.mark.hw_debug
def test_gdb_watchpoint_reports_old_and_new_values(guest_vm, debug_with_gdb):
    vm, seen = guest_vm(cpus=1)
    server, out = debug_with_gdb(
        vm,
        "break tick",
        "continue",
        "watch counter",
        "continue",
        "delete",
        "set var marker = 0x4321",
        "continue",
    )
    hit = out["continue#2"]
    assert "atchpoint 2: counter" in hit, out["all"]
    assert "Old value = 0" in hit and "New value = 1" in hit, hit
    assert_ran_to_end(out, "continue#3", server, seen, 0x4321)


@pytest.mark.hw_debug
def test_gdb_software_breakpoints_patch_and_hide_int3(gdb_guest, guest_vm, debug_with_gdb):
    vm, seen = guest_vm(cpus=1)
    tick = gdb_guest.address("tick")
    original = bytes(vm.mem_view(tick, 1))
    server, out = debug_with_gdb(
        vm,
        "break tick",
        "continue",
        "x/1bx tick",
        "continue",
        "p/x counter",
        "delete",
        "continue",
        breakpoints="software",
    )
    assert "Breakpoint 1, " in out["continue"] and "step=step@entry=1" in out["continue"], out["all"]
    assert f"0x{original[0]:02x}" in out["x/1bx tick"], "gdb reads the original byte"
    assert "step=step@entry=2" in out["continue#2"], out["all"]
    assert "= 0x1" in out["p/x counter"]
    assert_ran_to_end(out, "continue#3", server, seen, MARKER)
    assert bytes(vm.mem_view(tick, 1)) == original, "no int3 left behind"


# --------------------------------------------------------------------------- a raw client


def test_ctrl_c_interrupts_and_detach_leaves_the_vm_running(gdb_guest, guest_vm):
    vm, _ = guest_vm(arg=1)  # spins forever
    spins = gdb_guest.address("spins")
    server = vm.serve_gdb("127.0.0.1:0", breakpoints="hardware")
    vm.start()
    client = GdbRemote(server.port)
    assert client.ask("?").startswith("T05")
    # The client took the VM over: the run Python started ended.
    assert server.attached
    assert vm.wait(HANG_GUARD).reason is ExitReason.STOPPED
    assert not vm.running

    client.send("c")
    time.sleep(0.3)
    assert vm.running, "continue runs the VM"
    client.sock.sendall(b"\x03")
    stop = client.reply()
    assert stop.startswith("T02"), stop  # SIGINT
    assert not vm.running

    # 'g': the registers as the target description orders them; rip follows 16 general ones.
    regs = bytes.fromhex(client.ask("g"))
    rip = int.from_bytes(regs[128:136], "little")
    assert gdb_guest.inside("spin", rip), f"{rip:#x} is not in spin()"
    efer = int.from_bytes(regs[-8:], "little")
    assert efer & 0x500 == 0x500
    # 'm': memory by virtual address.
    counted = int.from_bytes(bytes.fromhex(client.ask(f"m{spins:x},8")), "little")
    assert counted > 0
    assert client.ask("m7fff00000000,8").startswith("E"), "not mapped"

    assert client.ask("D") == "OK"
    client.close()
    assert server.wait_detached(HANG_GUARD)
    assert vm.running, "detaching leaves the VM running"
    time.sleep(0.1)
    assert int.from_bytes(vm.mem_read(spins, 8), "little") > counted

    # A client that vanishes while the VM runs under it leaves it running too.
    client = attach_and_continue(server.port)
    client.close()
    settle(server, 2)
    assert vm.running
    counted = int.from_bytes(vm.mem_read(spins, 8), "little")
    time.sleep(0.1)
    assert int.from_bytes(vm.mem_read(spins, 8), "little") > counted

    # Closing the VM while a client has it running cuts the client off.
    client = attach_and_continue(server.port)
    vm.close()
    assert server.closed
    client.sock.settimeout(HANG_GUARD)
    left = b""
    while chunk := client.sock.recv(100):  # the server hangs up
        left += chunk
    assert left.strip(b"+") == b"", "nothing but acknowledgements"
    client.close()


def attach_and_continue(port: int) -> GdbRemote:
    """A client that stopped the VM and let it run again (for a moment by now)."""
    client = GdbRemote(port)
    assert client.ask("?").startswith("T05")
    client.send("c")
    time.sleep(0.1)
    return client


def test_watchpoints_take_debug_registers_and_give_them_back(gdb_guest, guest_vm):
    vm, _ = guest_vm()
    server = vm.serve_gdb("127.0.0.1:0")
    counter, marker = gdb_guest.address("counter"), gdb_guest.address("marker")
    client = GdbRemote(server.port)
    assert client.ask("?").startswith("T05")
    # An unaligned range takes one register per aligned piece: 1 + 2 + 1 bytes.
    assert client.ask(f"Z2,{counter + 3:x},4") == "OK"
    assert client.ask(f"Z4,{marker:x},8") == "OK"
    assert client.ask(f"Z3,{counter:x},8") != "OK", "all four registers are taken"
    assert client.ask(f"Z1,{gdb_guest.address('tick'):x},1") != "OK"
    assert client.ask(f"z2,{counter + 3:x},4") == "OK"
    assert client.ask(f"Z3,{counter:x},8") == "OK"
    assert client.ask(f"Z2,{counter:x},40") != "OK", "more pieces than registers"
    assert client.ask("D") == "OK"
    client.close()
    assert server.wait_detached(HANG_GUARD)
    vm.stop()
    vm.wait(HANG_GUARD)
    handles = [vm.add_watchpoint(counter + 8 * i, 8) for i in range(4)]
    assert len(handles) == 4, "the session gave every register back"
    server.close()


def settle(server, sessions: int) -> None:
    """Waits until the server has had `sessions` clients and none is attached."""
    deadline = time.monotonic() + HANG_GUARD
    while server.sessions < sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.sessions == sessions
    assert server.wait_detached(HANG_GUARD)


def test_ctrl_c_ends_a_step_stuck_in_a_handler(make_vm):
    vm = make_vm()
    vm.mem_write(0x1000, bytes.fromhex("e470f4"))  # in al, 0x70; hlt
    vm.vcpus[0].setup("long", entry=0x1000)
    vm.hook_io(0x70, read=lambda _port, _size: time.sleep(1.0) or 0x5A)
    server = vm.serve_gdb("127.0.0.1:0")
    client = GdbRemote(server.port)
    assert client.ask("?").startswith("T05")
    client.send("vCont;s:1")
    time.sleep(0.2)
    client.sock.sendall(b"\x03")
    assert client.reply().startswith("T02"), "the step ends as an interrupt"
    # Once the handler has returned, the `in` is complete.
    time.sleep(1.2)
    regs = bytes.fromhex(client.ask("g"))
    assert (regs[0], int.from_bytes(regs[128:136], "little")) == (0x5A, 0x1002)
    assert client.ask("D") == "OK"
    client.close()
    settle(server, 1)
    assert vm.wait(HANG_GUARD).reason is ExitReason.HLT
    server.close()


def test_garbage_and_vanishing_clients_leave_the_vm_usable(gdb_guest, guest_vm):
    vm, seen = guest_vm()
    server = vm.serve_gdb("127.0.0.1:0")
    tick = gdb_guest.address("tick")

    # Noise between packets, a bad checksum, unknown and malformed packets: nothing, a request to
    # send it again, an empty reply and error replies, and the session goes on.
    client = GdbRemote(server.port)
    assert client.ask("?").startswith("T05")
    client.sock.sendall(b"hello\x00\xff-$g#00")
    assert client.sock.recv(1) == b"-", "a packet with a bad checksum is asked for again"
    assert client.ask("vKvmkitNonsense") == ""
    for bad in ("m,", "mzz,4", "Z9,zz,1", "G00", "Hgzz", "M100,zz:00", "vCont;q"):
        assert client.ask(bad) == "E01", bad
    assert client.ask("?").startswith("T05")
    assert len(bytes.fromhex(client.ask("g"))) == 600
    # Then it hangs up: the session ends as a detach, which leaves the VM running (here, to the
    # guest's end).
    client.close()
    settle(server, 1)
    assert vm.wait(HANG_GUARD).reason is ExitReason.HLT
    assert (seen.reports, seen.exit_codes) == ([MARKER], [10])

    # A client that stops on a breakpoint and vanishes.
    vm.vcpus[0].setup("long", entry=gdb_guest.entry, stack=C_STACK_TOP)
    client = GdbRemote(server.port)
    assert client.ask("?").startswith("T05")
    assert client.ask(f"Z1,{tick:x},1") == "OK"
    client.send("c")
    stop = client.reply()
    assert stop.startswith("T05") and "hwbreak" in stop, stop
    assert int.from_bytes(bytes.fromhex(client.ask("g"))[128:136], "little") == tick
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()

    # Its breakpoint went with it and the guest ran on to its end.
    settle(server, 2)
    assert vm.wait(HANG_GUARD).reason is ExitReason.HLT
    assert (seen.reports, seen.exit_codes) == ([MARKER] * 2, [10] * 2)
    handles = [vm.add_watchpoint(0x8000 + 8 * i, 8) for i in range(4)]
    assert len(handles) == 4, "the four debug registers are free again"
    for handle in handles:
        handle.remove()

    # The server still serves.
    client = GdbRemote(server.port)
    assert client.ask("?").startswith("T05")
    assert client.ask("qfThreadInfo").startswith("m")
    assert client.ask("D") == "OK"
    client.close()
    settle(server, 3)
    server.close()
    assert server.closed
    # And Python drives the VM again.
    vm.stop()
    vm.wait(HANG_GUARD)
    vm.vcpus[0].setup("long", entry=gdb_guest.entry, stack=C_STACK_TOP)
    assert vm.run(timeout=HANG_GUARD).reason is ExitReason.HLT
    assert seen.reports == [MARKER] * 3


def test_serve_gdb_waits_for_a_client_and_kill_leaves_the_vm_stopped(gdb_guest, guest_vm):
    vm, seen = guest_vm()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    answers = []

    def client_side():
        deadline = time.monotonic() + HANG_GUARD
        while True:
            try:
                client = GdbRemote(port)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        answers.append(client.ask("?"))
        answers.append(client.ask("g"))
        client.send("k")
        time.sleep(0.1)
        client.close()

    thread = threading.Thread(target=client_side)
    thread.start()
    server = vm.serve_gdb(f"127.0.0.1:{port}", wait=True)
    assert server.sessions == 1, "serve_gdb(wait=True) returns once a client attached"
    thread.join(HANG_GUARD)
    assert answers[0].startswith("T05")
    rip = int.from_bytes(bytes.fromhex(answers[1])[128:136], "little")
    assert rip == gdb_guest.entry, "stopped before the first instruction"
    assert server.wait_detached(HANG_GUARD)
    assert not vm.running, "a killed VM stays stopped"
    assert seen.reports == []
    assert vm.run(timeout=HANG_GUARD).reason is ExitReason.HLT
    assert seen.reports == [MARKER]
    server.close()


def test_cli_run_leaves_the_vm_to_an_attached_client(gdb_guest, guest_vm):
    from kvmkit.cli import _run_under_gdb

    vm, _ = guest_vm(arg=1)  # spins forever
    server = vm.serve_gdb("127.0.0.1:0")
    ended = []
    runner = threading.Thread(target=lambda: ended.append(_run_under_gdb(vm, server)))
    runner.start()
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not vm.running and time.monotonic() < deadline:
            time.sleep(0.01)
        client = GdbRemote(server.port)
        assert client.ask("?").startswith("T05"), "the client stopped the CLI's run"
        time.sleep(0.2)
        assert runner.is_alive() and not vm.running, "the CLI waits while gdb holds the VM"
        assert client.ask("D") == "OK"
        client.close()
        assert server.wait_detached(HANG_GUARD)
        time.sleep(0.2)
        assert runner.is_alive() and vm.running, "the CLI waits for the VM gdb left running"
        vm.stop()
    finally:
        runner.join(HANG_GUARD)
    assert [exit_.reason for exit_ in ended] == [ExitReason.STOPPED]
    server.close()


def test_cli_wait_needs_gdb(capsys):
    from kvmkit.cli import main

    assert main(["run", "--wait"]) == 2
    assert "--wait needs --gdb" in capsys.readouterr().err


# mov eax, 0; 1: inc eax; cmp eax, 10; jne 1b; hlt
COUNT_LOOP = bytes.fromhex("b800000000 ffc0 83f80a 75f9 f4")


def rip_and_rax(client: GdbRemote) -> tuple[int, int]:
    regs = bytes.fromhex(client.ask("g"))
    return le(regs[128:136]), le(regs[0:8])


@pytest.mark.standard_kvm
def test_reverse_steps_and_continues_replay_the_recorded_run(make_vm):
    vm = make_vm()
    vm.mem_write(0x1000, COUNT_LOOP)
    vm.vcpus[0].setup("long", entry=0x1000)
    server = vm.serve_gdb("127.0.0.1:0", reverse=True)
    with GdbRemote(server.port) as client:
        assert client.ask("?").startswith("T05")
        forward = []
        for _ in range(3):
            assert client.ask("vCont;s:1").startswith("T05")
            forward.append(rip_and_rax(client))
        assert forward == [(0x1005, 0), (0x1007, 1), (0x100A, 1)]
        backward = []
        for _ in range(3):
            assert client.ask("bs").startswith("T05")
            backward.append(rip_and_rax(client))
        assert backward == [(0x1007, 1), (0x1005, 0), (0x1000, 0)]
        assert "replaylog:begin" in client.ask("bs"), "nothing recorded before the start"

        # A breakpoint, checked against RIP after each recorded step.
        assert client.ask("Z0,1007,1") == "OK"
        hits = []
        for _ in range(3):
            assert "swbreak" in client.ask("vCont;c")
            hits.append(rip_and_rax(client))
        assert hits == [(0x1007, 1), (0x1007, 2), (0x1007, 3)]
        for expected in [(0x1007, 2), (0x1007, 1)]:
            assert "swbreak" in client.ask("bc")
            assert rip_and_rax(client) == expected
        assert "replaylog:begin" in client.ask("bc")
        assert rip_and_rax(client) == (0x1000, 0)

        # Forward again over the same path, then a change from gdb starts a new recording.
        assert "swbreak" in client.ask("vCont;c") and rip_and_rax(client) == (0x1007, 1)
        regs = bytearray(bytes.fromhex(client.ask("g")))
        regs[0:8] = (7).to_bytes(8, "little")
        assert client.ask("G" + regs.hex()) == "OK"
        assert "replaylog:begin" in client.ask("bs")
        assert client.ask("vCont;s:1").startswith("T05") and rip_and_rax(client) == (0x100A, 7)
        assert "replaylog:begin" not in client.ask("bs") and rip_and_rax(client) == (0x1007, 7)
        # Detaching leaves the guest running freely to its end.
        assert client.ask("D") == "OK"
    settle(server, 1)
    assert vm.wait(HANG_GUARD).reason is ExitReason.HLT
    assert vm.vcpus[0].reg_read("eax") == 10


def test_reverse_execution_needs_one_vcpu(make_vm):
    vm = make_vm(cpus=2)
    for cpu in vm.vcpus:
        vm.mem_write(0x1000, COUNT_LOOP)
        cpu.setup("long", entry=0x1000)
    server = vm.serve_gdb("127.0.0.1:0", reverse=True)
    with GdbRemote(server.port) as client:
        assert client.ask("?").startswith("T05")
        assert client.ask("bs") == "", "not offered: two vCPUs do not interleave the same way twice"
        assert client.ask("D") == "OK"
    server.close()


@pytest.mark.standard_kvm
def test_gdb_reverse_commands_go_back_through_the_guest(gdb_guest, guest_vm, debug_with_gdb):
    vm, seen = guest_vm()
    server, out = debug_with_gdb(
        vm,
        "break tick",
        "continue",
        "continue",
        "continue",
        "p $rdi",
        "p counter",
        "reverse-continue",
        "p $rdi",
        "p counter",
        "reverse-stepi",
        "p/x $pc",
        "delete",
        "detach",
        reverse=True,
    )
    everything = out["all"]
    assert "= 3" in out["p $rdi"] and "= 3" in out["p counter"], everything
    assert "Breakpoint 1, " in out["reverse-continue"], everything
    assert "= 2" in out["p $rdi#2"] and "= 1" in out["p counter#2"], "back at tick(2), before it added"
    assert int(out["p/x $pc"].split("=")[1], 16) != gdb_guest.address("tick"), everything
    # Detached, the guest runs on from there to its end, adding each tick once.
    settle(server, 1)
    assert vm.wait(HANG_GUARD).reason is ExitReason.HLT
    assert seen.exit_codes == [10] and seen.reports == [MARKER]


def test_serve_gdb_arguments(make_vm):
    from kvmkit.errors import ConfigError

    vm = make_vm()
    with pytest.raises(ConfigError, match="breakpoints"):
        vm.serve_gdb("127.0.0.1:0", breakpoints="magic")  # type: ignore[arg-type]
    with pytest.raises(OSError):
        vm.serve_gdb("no-such-host.invalid:1")
    with vm.serve_gdb("127.0.0.1:0") as server:
        assert server.port > 0 and not server.attached
        assert not server.wait_attached(0.05)
        assert server.wait_detached(0)
        assert "listening" in repr(server)
    assert server.closed
    server.close()  # harmless
    # Closing the VM closes its servers.
    server = vm.serve_gdb("127.0.0.1:0")
    vm.close()
    assert server.closed
