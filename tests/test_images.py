"""Guest images: the initramfs writer, vmlinux extraction from a bzImage, the default guest.

None of these need KVM. The default-guest tests download Debian's cloud kernel and busybox-static
with apt (once per session, into a temporary cache).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import re
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import pytest
import zstandard
from kvmkit import images
from kvmkit._core import Initramfs
from kvmkit.errors import ConfigError, ImageError, KvmkitError

# --------------------------------------------------------------------------- a newc reader


@dataclass(frozen=True)
class Entry:
    ino: int
    mode: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def align4(offset: int) -> int:
    return (offset + 3) & ~3


def read_newc(archive: bytes) -> dict[str, Entry]:
    """Every entry of a newc archive by name, in archive order; checks the framing on the way."""
    entries: dict[str, Entry] = {}
    offset = 0
    while True:
        assert offset % 4 == 0
        assert archive[offset : offset + 6] == b"070701", f"no newc header at {offset:#x}"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rdev_major, rdev_minor, namesize, check = fields
        assert (uid, gid, check) == (0, 0, 0)
        name_end = offset + 110 + namesize
        assert archive[name_end - 1] == 0, "names end with NUL"
        name = archive[offset + 110 : name_end - 1].decode()
        start = align4(name_end)
        assert archive[name_end:start] == bytes(start - name_end)
        data = archive[start : start + size]
        offset = align4(start + size)
        assert archive[start + size : offset] == bytes(offset - start - size)
        if name == "TRAILER!!!":
            assert offset == len(archive), "bytes after the trailer"
            return entries
        assert name not in entries, f"{name} twice"
        entries[name] = Entry(ino, mode, nlink, mtime, (rdev_major, rdev_minor), data)


# --------------------------------------------------------------------------- Initramfs


def test_initramfs_round_trips_through_an_independent_reader():
    archive = Initramfs()
    archive.add_dir("bin")
    archive.add_file("bin/busybox", b"\x7fELF\x00\xff" * 3, 0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file("/etc/motd", bytearray(b"hi\n"))
    archive.add_dir("tmp", mode=0o1777)
    archive.add_char_device("dev/console", 5, 1)
    entries = read_newc(archive.finish())

    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "etc", "etc/motd", "tmp", "dev", "dev/console"]
    assert entries["bin"].mode == stat.S_IFDIR | 0o755
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/busybox"].data == b"\x7fELF\x00\xff" * 3
    assert entries["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert entries["bin/sh"].data == b"busybox"
    assert entries["etc"].mode == stat.S_IFDIR | 0o755, "parents are added for what they contain"
    assert entries["etc/motd"].mode == stat.S_IFREG | 0o644
    assert entries["etc/motd"].data == b"hi\n"
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    assert entries["dev/console"].mode == stat.S_IFCHR | 0o600
    assert entries["dev/console"].rdev == (5, 1)
    assert sorted(entry.ino for entry in entries.values()) == list(range(1, 9))
    assert {entry.mtime for entry in entries.values()} == {0}


def test_initramfs_is_reproducible():
    def build() -> bytes:
        archive = Initramfs()
        archive.add_file("init", b"#!/bin/sh\n", 0o755)
        return archive.finish()

    assert build() == build()


@pytest.mark.parametrize("path", ["", "/", "/../etc/passwd", "a/../../b", "a\0b"])
def test_initramfs_rejects_bad_paths_with_config_error(path):
    with pytest.raises(ConfigError, match="initramfs path"):
        Initramfs().add_file(path, b"")


def test_initramfs_rejects_duplicates_type_bits_in_modes_and_use_after_finish():
    archive = Initramfs()
    archive.add_file("init", b"")
    with pytest.raises(ConfigError, match="already in the archive"):
        archive.add_symlink("init", "bin/sh")
    with pytest.raises(ConfigError, match="permission bits"):
        archive.add_file("x", b"", 0o100644)
    archive.finish()
    with pytest.raises(ConfigError, match="already finished"):
        archive.add_dir("bin")
    with pytest.raises(ConfigError, match="already finished"):
        archive.finish()


# --------------------------------------------------------------------------- extract_vmlinux


def fake_elf(size: int = 200_000) -> bytes:
    """An ELF magic and a mix of random and repetitive bytes, like code and data."""
    rng = random.Random(size)
    body = b"".join(rng.randbytes(64) + b"\x90" * rng.randrange(256) for _ in range(size // 160))
    return b"\x7fELF\x02\x01\x01" + body


def lz4_legacy(data: bytes, block: int) -> bytes:
    out = struct.pack("<I", 0x184C2102)
    for start in range(0, len(data), block):
        compressed = lz4.block.compress(data[start : start + block], store_size=False)
        out += struct.pack("<I", len(compressed)) + compressed
    return out


COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, 9, mtime=0),
    "xz": lambda data: lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda data: lzma.compress(data, lzma.FORMAT_ALONE, preset=9),
    "bzip2": lambda data: bz2.compress(data, 9),
    # Several blocks, as a kernel larger than one 8 MiB block has.
    "lz4": lambda data: lz4_legacy(data, 64 << 10),
    "zstd": lambda data: zstandard.ZstdCompressor(level=19, write_content_size=False).compress(data),
}


def fake_bzimage(payload: bytes, version: int = 0x020F, setup_sects: int = 4) -> bytes:
    """A setup header pointing at ``payload``, which sits between stub code and trailing data."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    code = b"\xfc\x31\xc0" * 300  # stands in for the decompressor stub
    if version >= 0x0208:
        struct.pack_into("<II", setup, 0x248, len(code), len(payload))
    return bytes(setup) + code + payload + b"\xcc" * 4096


def kernel_payload(compression: str, elf: bytes) -> bytes:
    """What the kernel's build puts in a bzImage: the compressed vmlinux and its size (LE32)."""
    return COMPRESSORS[compression](elf) + struct.pack("<I", len(elf))


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_extract_vmlinux_reads_every_kernel_compression(compression):
    elf = fake_elf()
    assert images.extract_vmlinux(fake_bzimage(kernel_payload(compression, elf))) == elf


@pytest.mark.parametrize("compression", ["gzip", "xz", "lz4"])
def test_extract_vmlinux_scans_for_the_payload_without_a_2_08_header(compression):
    elf = fake_elf(50_000)
    assert images.extract_vmlinux(fake_bzimage(kernel_payload(compression, elf), version=0x0206)) == elf


@pytest.mark.parametrize(
    "image",
    [
        b"",
        b"\x00" * 4096,
        random.Random(1).randbytes(100_000),
        fake_bzimage(kernel_payload("gzip", b"not an ELF file" * 100)),
        fake_bzimage(kernel_payload("xz", fake_elf())[:5000]),  # truncated
    ],
    ids=["empty", "zeros", "random", "not-elf", "truncated"],
)
def test_extract_vmlinux_rejects_what_holds_no_compressed_elf(image):
    with pytest.raises(ImageError, match="no compressed ELF kernel"):
        images.extract_vmlinux(image)


def test_image_error_is_a_kvmkit_error():
    assert issubclass(ImageError, KvmkitError)


# --------------------------------------------------------------------------- default guest


def test_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert images.cache_root() == tmp_path / "kvmkit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert images.cache_root() == tmp_path / "home" / ".cache" / "kvmkit"
    assert images.cache_root(tmp_path / "mine") == tmp_path / "mine"


def test_default_guest_without_apt_says_to_pass_kernel_and_initrd(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="--kernel and --initrd"):
        images.default_guest(tmp_path / "cache")


@pytest.fixture(scope="session")
def guest(tmp_path_factory) -> images.GuestImage:
    """The default guest, built once per session into a fresh cache (downloads from Debian)."""
    return images.default_guest(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def initrd(guest) -> dict[str, Entry]:
    return read_newc(guest.initrd.read_bytes())


def test_default_guest_is_cached_by_kernel_version(guest):
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", guest.kernel_version)
    directory = guest.kernel.parent
    assert directory.parent.name == "guests"
    assert directory.name.startswith(f"{guest.kernel_version}_")
    assert {path.name for path in directory.iterdir()} == {"bzImage", "vmlinux", "initrd.cpio"}
    assert [path.name for path in directory.parent.iterdir()] == [directory.name], "no staging left"
    assert guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    assert "console=ttyS0" in guest.cmdline

    mtimes = [path.stat().st_mtime_ns for path in directory.iterdir()]
    again = images.default_guest(directory.parent.parent)
    assert again == guest
    assert [path.stat().st_mtime_ns for path in directory.iterdir()] == mtimes, "the cache was rebuilt"


APT_TOOLS = ("apt", "apt-get", "apt-cache", "apt-config", "dpkg", "dpkg-deb", "dpkg-query")


@pytest.fixture
def no_apt(tmp_path, monkeypatch) -> Path:
    """PATH holds only shims of apt's and dpkg's tools (and the C compiler) that fail loudly and
    log their calls; subprocess.run is watched too. Returns the log, which must stay absent."""
    shims = tmp_path / "shims"
    shims.mkdir()
    calls = tmp_path / "apt-calls"
    for tool in (*APT_TOOLS, "cc", "gcc"):
        shim = shims / tool
        shim.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\necho "{tool} was run" >&2\nexit 99\n')
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", str(shims))
    real_run = subprocess.run

    def watched_run(*args, **kwargs):
        with calls.open("a") as log:
            log.write(f"subprocess.run {args} {kwargs}\n")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(images.subprocess, "run", watched_run)
    # As after an `apt-get update` since the guest was built: apt's remembered answer is stale.
    monkeypatch.setattr(images, "_apt_lists_stamp", lambda: -1)
    return calls


def test_cached_default_guest_needs_no_apt(guest, no_apt, monkeypatch):
    cache = guest.kernel.parent.parent.parent
    assert images.default_guest(cache) == guest
    assert not no_apt.exists(), no_apt.read_text()
    # No apt at all on the PATH: the cached guest is still found.
    monkeypatch.setenv("PATH", str(no_apt.parent / "empty"))
    assert images.default_guest(cache) == guest
    assert not no_apt.exists(), no_apt.read_text()


def test_cached_default_guest_is_found_without_apts_answer(guest, no_apt, tmp_path):
    """A cache holding only the guest (apt-resolved.json gone, as in a copied cache) still needs
    no apt: the newest guest of the current recipe is used."""
    folder = guest.kernel.parent
    cache = tmp_path / "copied"
    (cache / "guests").mkdir(parents=True)
    (cache / "guests" / folder.name).symlink_to(folder)
    (cache / "guests" / f".{folder.name}.staging").mkdir()  # an unfinished build is not a guest
    found = images.default_guest(cache)
    assert found.kernel_version == guest.kernel_version
    assert found.kernel == cache / "guests" / folder.name / "bzImage"
    assert not no_apt.exists(), no_apt.read_text()


def test_a_new_recipe_is_not_served_from_the_cache(guest, tmp_path, monkeypatch):
    """A cached guest of another recipe (an older agent or /init) is not used: without apt, the
    default guest then says what to do instead."""
    folder = guest.kernel.parent
    cache = tmp_path / "cache"
    (cache / "guests").mkdir(parents=True)
    (cache / "guests" / folder.name).symlink_to(folder)
    monkeypatch.setattr(images, "guest_recipe", lambda: "0123456789ab")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ImageError, match="--kernel and --initrd"):
        images.default_guest(cache)


def test_default_guest_vmlinux_is_an_x86_64_executable_with_notes(guest):
    elf = guest.vmlinux.read_bytes()
    assert elf[:4] == b"\x7fELF"
    assert (elf[4], elf[5]) == (2, 1), "64-bit little-endian"
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    assert (e_type, e_machine) == (2, 62), "ET_EXEC for EM_X86_64"
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 4 in types, f"no PT_NOTE among program header types {types}"
    assert images.extract_vmlinux(guest.kernel.read_bytes()) == elf


def test_default_guest_initrd_holds_busybox_console_and_applets(initrd):
    assert initrd["bin/busybox"].data[:4] == b"\x7fELF"
    assert initrd["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert stat.S_ISCHR(initrd["dev/console"].mode)
    assert initrd["dev/console"].rdev == (5, 1)
    for applet in ("sh", "mount", "insmod", "devmem", "setsid", "cttyhack", "reboot"):
        assert initrd[f"bin/{applet}"].data == b"busybox", applet
    for directory in ("proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(initrd[directory].mode), directory


def loaded_modules(initrd: dict[str, Entry]) -> list[str]:
    """The module paths /init loads, in order."""
    return re.findall(r"^load /(\S+\.ko)$", initrd["init"].data.decode(), re.MULTILINE)


def test_default_guest_init_mounts_loads_signals_and_runs_a_shell(initrd, guest):
    init = initrd["init"]
    assert init.mode == stat.S_IFREG | 0o755
    script = init.data.decode()
    assert script.startswith("#!/bin/sh\n")
    lines = script.splitlines()
    steps = [
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "devmem 0xd0000000 8 123",
        "echo kvmkit-guest-ready",
        "setsid cttyhack sh",
        "reboot -f",
    ]
    positions = [lines.index(step) for step in steps]
    assert positions == sorted(positions), "the steps of /init are out of order"
    assert all(lines.index(f"load /{module}") < positions[3] for module in loaded_modules(initrd))
    assert all(
        module.startswith(f"lib/modules/{guest.kernel_version}/kernel/") for module in loaded_modules(initrd)
    )


def modinfo_depends(module: bytes) -> list[str]:
    match = re.search(rb"\0depends=([^\0]*)\0", module)
    return [name.replace("-", "_") for name in match.group(1).decode().split(",") if name] if match else []


def test_default_guest_modules_are_present_and_load_after_their_dependencies(initrd):
    order = loaded_modules(initrd)
    names = [Path(path).stem.replace("-", "_") for path in order]
    for wanted in ("virtio_blk", "virtio_net", "virtio_rng", "vmw_vsock_virtio_transport", "virtio_pci"):
        assert wanted in names, f"{wanted} missing from {names}"
    assert len(set(names)) == len(names)
    for position, path in enumerate(order):
        module = initrd[path].data
        assert module[:4] == b"\x7fELF", f"{path} is not a plain ELF module"
        assert initrd[path].mode == stat.S_IFREG | 0o644
        for dependency in modinfo_depends(module):
            assert dependency in names[:position], f"{names[position]} is loaded before {dependency}"


def test_compressed_modules_are_unpacked_and_built_in_ones_skipped(initrd, tmp_path):
    """A kernel tree shipping .ko.xz / .ko.zst, with virtio_ring built in (as other kernels have it)."""
    real = {Path(path).name: entry.data for path, entry in initrd.items() if path.endswith(".ko")}
    assert modinfo_depends(real["virtio_blk.ko"]) == ["virtio", "virtio_ring"]
    module_dir = tmp_path / "lib" / "modules" / "9.9.9-test"
    (module_dir / "kernel" / "drivers" / "block").mkdir(parents=True)
    (module_dir / "kernel" / "drivers" / "virtio").mkdir()
    (module_dir / "kernel/drivers/block/virtio_blk.ko.xz").write_bytes(lzma.compress(real["virtio_blk.ko"]))
    compressed = zstandard.ZstdCompressor().compress(real["virtio.ko"])
    (module_dir / "kernel/drivers/virtio/virtio.ko.zst").write_bytes(compressed)
    (module_dir / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")

    tree = images.KernelTree.load(module_dir)
    assert tree.load_order(["virtio_blk"]) == [
        ("lib/modules/9.9.9-test/kernel/drivers/virtio/virtio.ko", real["virtio.ko"]),
        ("lib/modules/9.9.9-test/kernel/drivers/block/virtio_blk.ko", real["virtio_blk.ko"]),
    ]
    with pytest.raises(ImageError, match="no module virtio_net"):
        tree.load_order(["virtio_net"])


def test_apts_answer_is_remembered_until_its_lists_change(tmp_path, monkeypatch):
    asked: list[list[str]] = []
    answers = {
        "depends": "linux-image-cloud-amd64\n  Depends: linux-image-9.9.9-1-cloud-amd64\n",
        "policy": "linux-image-9.9.9-1-cloud-amd64:\n  Installed: (none)\n  Candidate: 9.9.9-1\n",
    }

    def fake_apt(command, cwd=None):
        asked.append(command)
        return answers[command[1]]

    stamp = [1]
    monkeypatch.setattr(images, "_run", fake_apt)
    monkeypatch.setattr(images, "_apt_lists_stamp", lambda: stamp[0])
    first = images.resolve_kernel(cache_dir=tmp_path)
    assert (first.name, first.version) == ("linux-image-9.9.9-1-cloud-amd64", "9.9.9-1")
    assert len(asked) == 2
    assert images.resolve_kernel(cache_dir=tmp_path) == first
    assert len(asked) == 2, "apt was asked again although its lists did not change"
    stamp[0] = 2  # apt-get update
    answers["policy"] = answers["policy"].replace("9.9.9-1\n", "9.9.9-2\n")
    assert images.resolve_kernel(cache_dir=tmp_path).version == "9.9.9-2"
    assert len(asked) == 4


def test_apt_is_asked_in_the_c_locale_whatever_the_users_language(monkeypatch):
    """A German ``LANGUAGE`` makes apt answer "Installationskandidat:" where kvmkit parses
    "Candidate:"; kvmkit runs apt in the C locale."""
    # LANGUAGE chooses the translation under any locale but C (C.UTF-8 is always there).
    monkeypatch.setenv("LANGUAGE", "de")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    assert images.candidate("bash").name == "bash"
