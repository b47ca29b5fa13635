//! A writer for newc-format cpio archives, the format Linux unpacks as its initramfs.
//!
//! Each entry is a 110-byte ASCII header ("070701" and thirteen 8-digit hex fields), the entry's
//! name with its NUL, padding to a multiple of 4 bytes, then the data, padded the same way. A
//! `TRAILER!!!` entry ends the archive. Every entry gets mtime 0 and owner root so that the
//! same inputs always give the same bytes, which lets callers cache and compare archives.

use std::collections::HashSet;

use thiserror::Error;

/// The magic of a newc header without checksums.
const MAGIC: &[u8; 6] = b"070701";
/// The name of the entry that ends every archive.
const TRAILER: &str = "TRAILER!!!";
/// Entries, names and data all start on 4-byte boundaries.
const ALIGN: usize = 4;
/// The permission bits a caller may set: rwx for all, plus setuid, setgid and sticky.
const PERMISSION_BITS: u32 = 0o7777;
/// The mode of directories that are added because something inside them was.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// File type bits of `st_mode` (from `<sys/stat.h>`), which the kernel uses to pick what to create.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Why an entry cannot go into the archive.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InitramfsError {
    /// The path is empty or names only the archive root.
    #[error("initramfs path {0:?} names no file; give a path such as \"bin/sh\"")]
    EmptyPath(String),
    /// The path holds a NUL byte, which would end the name early inside the archive.
    #[error("initramfs path {0:?} contains a NUL byte")]
    NulInPath(String),
    /// The path has a `..` component, which could reach outside the unpacked tree.
    #[error("initramfs path {0:?} contains '..'; use a path inside the archive without parent references")]
    ParentComponent(String),
    /// Something is already stored under this path.
    #[error("initramfs path {0:?} is already in the archive (directories are added automatically for their contents; add a directory before its contents to choose its mode)")]
    Duplicate(String),
    /// A parent of the path is a file, a symlink or a device, not a directory.
    #[error("cannot add {path:?}: its parent {parent:?} is in the archive but is not a directory")]
    ParentNotDirectory {
        /// The path being added.
        path: String,
        /// The parent that is not a directory.
        parent: String,
    },
    /// The mode has bits beyond the permission bits; the file type comes from the method called.
    #[error("mode {mode:#o} of {path:?} has bits outside 0o7777; pass only permission bits")]
    InvalidMode {
        /// The path being added.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// A symlink target is empty or holds a NUL byte.
    #[error("symlink {path:?} needs a non-empty target without NUL bytes, got {target:?}")]
    InvalidTarget {
        /// The symlink being added.
        path: String,
        /// The target given.
        target: String,
    },
    /// newc stores sizes in 32 bits.
    #[error("{path:?} is {size} bytes, but a newc archive holds files of at most 4 GiB - 1 bytes")]
    TooLarge {
        /// The file being added.
        path: String,
        /// Its size in bytes.
        size: usize,
    },
}

/// The header fields that differ between entries; the others are fixed for reproducibility.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

/// Builds a newc cpio archive in memory, one entry at a time.
///
/// Paths are relative to the archive root; a leading `/`, empty components and `.` components are
/// dropped, so "/bin//sh" and "bin/sh" name the same entry. Missing parent directories are added
/// with mode 0o755 before an entry, because the kernel does not create them while unpacking.
#[derive(Debug, Default)]
pub struct Initramfs {
    bytes: Vec<u8>,
    /// The last inode number given out; entries are numbered from 1.
    last_ino: u32,
    directories: HashSet<String>,
    others: HashSet<String>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory with the permission bits `mode`.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), InitramfsError> {
        let name = self.prepare(path, mode)?;
        self.push(&name, S_IFDIR | mode, 2, (0, 0), &[]);
        self.directories.insert(name);
        Ok(())
    }

    /// Adds a regular file holding `data`, with the permission bits `mode`.
    pub fn add_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), InitramfsError> {
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge { path: path.to_owned(), size: data.len() });
        }
        let name = self.prepare(path, mode)?;
        self.push(&name, S_IFREG | mode, 1, (0, 0), data);
        self.others.insert(name);
        Ok(())
    }

    /// Adds a symbolic link to `target`, which is stored as given (absolute or relative).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::InvalidTarget { path: path.to_owned(), target: target.to_owned() });
        }
        let name = self.prepare(path, 0o777)?;
        self.push(&name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
        self.others.insert(name);
        Ok(())
    }

    /// Adds a character device node `major:minor`, such as /dev/console (5:1), which the kernel
    /// opens for init's stdio before any devtmpfs is mounted.
    pub fn add_char_device(&mut self, path: &str, major: u32, minor: u32, mode: u32) -> Result<(), InitramfsError> {
        let name = self.prepare(path, mode)?;
        self.push(&name, S_IFCHR | mode, 1, (major, minor), &[]);
        self.others.insert(name);
        Ok(())
    }

    /// Ends the archive with its trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let header = Header { ino: 0, mode: 0, nlink: 1, filesize: 0, rdev_major: 0, rdev_minor: 0 };
        self.write_entry(TRAILER, &header, &[]);
        self.bytes
    }

    /// Checks `path` and `mode`, adds missing parent directories and returns the entry's name.
    fn prepare(&mut self, path: &str, mode: u32) -> Result<String, InitramfsError> {
        let name = normalize(path)?;
        if mode & !PERMISSION_BITS != 0 {
            return Err(InitramfsError::InvalidMode { path: path.to_owned(), mode });
        }
        if self.directories.contains(&name) || self.others.contains(&name) {
            return Err(InitramfsError::Duplicate(name));
        }
        self.add_parents(&name)?;
        Ok(name)
    }

    /// Adds every ancestor of `name` that is not in the archive yet, outermost first.
    fn add_parents(&mut self, name: &str) -> Result<(), InitramfsError> {
        let ancestors = name.match_indices('/').map(|(end, _)| &name[..end]);
        for parent in ancestors {
            if self.others.contains(parent) {
                return Err(InitramfsError::ParentNotDirectory { path: name.to_owned(), parent: parent.to_owned() });
            }
            if !self.directories.contains(parent) {
                self.push(parent, S_IFDIR | IMPLICIT_DIR_MODE, 2, (0, 0), &[]);
                self.directories.insert(parent.to_owned());
            }
        }
        Ok(())
    }

    /// Appends an entry with the next inode number. `data` fits 32 bits (checked by the callers).
    fn push(&mut self, name: &str, mode: u32, nlink: u32, (rdev_major, rdev_minor): (u32, u32), data: &[u8]) {
        self.last_ino += 1;
        let filesize = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let header = Header { ino: self.last_ino, mode, nlink, filesize, rdev_major, rdev_minor };
        self.write_entry(name, &header, data);
    }

    /// Writes one header, name and data, each padded to the next 4-byte boundary.
    fn write_entry(&mut self, name: &str, header: &Header, data: &[u8]) {
        let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        self.bytes.extend_from_slice(MAGIC);
        let fields = [
            header.ino,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            0, // mtime: fixed so archives are reproducible
            header.filesize,
            0, // devmajor of the filesystem the entry came from
            0, // devminor
            header.rdev_major,
            header.rdev_minor,
            namesize,
            0, // check: unused by "070701"
        ];
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Zero-fills up to the next 4-byte boundary of the archive.
    fn pad(&mut self) {
        let padded = self.bytes.len().next_multiple_of(ALIGN);
        self.bytes.resize(padded, 0);
    }
}

/// The archive name of `path`: relative, with no empty, `.` or `..` components.
fn normalize(path: &str) -> Result<String, InitramfsError> {
    if path.contains('\0') {
        return Err(InitramfsError::NulInPath(path.to_owned()));
    }
    let mut components = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(InitramfsError::ParentComponent(path.to_owned())),
            other => components.push(other),
        }
    }
    if components.is_empty() {
        return Err(InitramfsError::EmptyPath(path.to_owned()));
    }
    Ok(components.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    const HEADER_LEN: usize = 110;

    /// The 8-hex-digit field `index` (0 = c_ino) of the header at `offset`.
    fn field(archive: &[u8], offset: usize, index: usize) -> u32 {
        let start = offset + 6 + index * 8;
        let text = std::str::from_utf8(&archive[start..start + 8]).expect("header fields are ASCII");
        u32::from_str_radix(text, 16).expect("header fields are hex")
    }

    #[test]
    fn file_entry_header_name_and_data_are_laid_out_byte_by_byte() {
        let mut archive = Initramfs::new();
        archive.add_file("init", b"hello", 0o755).unwrap();
        let bytes = archive.finish();

        let mut expected = Vec::new();
        expected.extend_from_slice(b"070701");
        expected.extend_from_slice(b"00000001"); // ino
        expected.extend_from_slice(b"000081ed"); // mode: S_IFREG | 0o755
        expected.extend_from_slice(b"00000000"); // uid
        expected.extend_from_slice(b"00000000"); // gid
        expected.extend_from_slice(b"00000001"); // nlink
        expected.extend_from_slice(b"00000000"); // mtime
        expected.extend_from_slice(b"00000005"); // filesize
        expected.extend_from_slice(b"0000000000000000"); // devmajor, devminor
        expected.extend_from_slice(b"0000000000000000"); // rdevmajor, rdevminor
        expected.extend_from_slice(b"00000005"); // namesize: "init" and its NUL
        expected.extend_from_slice(b"00000000"); // check
        expected.extend_from_slice(b"init\0"); // 110 + 5 = 115 ...
        expected.push(0); // ... padded to 116
        expected.extend_from_slice(b"hello\0\0\0"); // 5 bytes of data padded to 8
        assert_eq!(&bytes[..expected.len()], &expected[..]);

        let trailer = &bytes[expected.len()..];
        assert_eq!(&trailer[..6], b"070701");
        assert_eq!(field(trailer, 0, 0), 0, "the trailer has no inode");
        assert_eq!(field(trailer, 0, 4), 1, "the trailer's nlink");
        assert_eq!(field(trailer, 0, 11), 11, "namesize of TRAILER!!! with its NUL");
        assert_eq!(&trailer[HEADER_LEN..HEADER_LEN + 11], b"TRAILER!!!\0");
        // 110 + 11 = 121, padded to 124; the archive ends there.
        assert_eq!(trailer.len(), 124);
        assert!(trailer[HEADER_LEN + 11..].iter().all(|&b| b == 0));
    }

    /// The offset and name of every entry, checking alignment, padding and the end of the archive.
    fn entries(bytes: &[u8]) -> Vec<(usize, String)> {
        let mut offset = 0;
        let mut found = Vec::new();
        loop {
            assert_eq!(offset % 4, 0, "entry at {offset} is not aligned");
            assert_eq!(&bytes[offset..offset + 6], b"070701", "no header at {offset}");
            let namesize = field(bytes, offset, 11) as usize;
            let filesize = field(bytes, offset, 6) as usize;
            let name_end = offset + HEADER_LEN + namesize;
            let name = std::str::from_utf8(&bytes[offset + HEADER_LEN..name_end - 1]).unwrap().to_owned();
            assert_eq!(bytes[name_end - 1], 0, "name of {name} is not NUL-terminated");
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + filesize;
            assert!(bytes[name_end..data_start].iter().all(|&b| b == 0), "padding after the name of {name}");
            assert!(bytes[data_end..data_end.next_multiple_of(4)].iter().all(|&b| b == 0), "padding after {name}");
            found.push((offset, name));
            offset = data_end.next_multiple_of(4);
            if found.last().is_some_and(|(_, name)| name == TRAILER) {
                assert_eq!(offset, bytes.len(), "bytes after the trailer");
                return found;
            }
        }
    }

    fn names(bytes: &[u8]) -> Vec<String> {
        entries(bytes).into_iter().map(|(_, name)| name).collect()
    }

    #[test]
    fn every_entry_starts_on_a_four_byte_boundary_whatever_the_name_and_data_lengths() {
        let mut archive = Initramfs::new();
        for len in 1..=8 {
            archive.add_file(&"n".repeat(len), &vec![b'x'; len], 0o644).unwrap();
        }
        let bytes = archive.finish();
        let found = entries(&bytes);
        let names: Vec<&str> = found.iter().map(|(_, name)| name.as_str()).collect();
        assert_eq!(names, ["n", "nn", "nnn", "nnnn", "nnnnn", "nnnnnn", "nnnnnnn", "nnnnnnnn", TRAILER]);
        // Name n (with its NUL) and n bytes of data: header + name padded, then data padded.
        for (len, window) in (1..=8).zip(found.windows(2)) {
            let expected = (HEADER_LEN + len + 1).next_multiple_of(4) + len.next_multiple_of(4);
            assert_eq!(window[1].0 - window[0].0, expected, "entry of length {len}");
        }
    }

    #[test]
    fn entries_get_consecutive_inodes_and_their_type_bits() {
        let mut archive = Initramfs::new();
        archive.add_dir("dev", 0o755).unwrap();
        archive.add_char_device("dev/console", 5, 1, 0o600).unwrap();
        archive.add_symlink("sh", "/bin/busybox").unwrap();
        let bytes = archive.finish();

        assert_eq!(field(&bytes, 0, 0), 1);
        assert_eq!(field(&bytes, 0, 1), 0o040_755);
        assert_eq!(field(&bytes, 0, 4), 2, "a directory has nlink 2");

        let console = 116; // 110 + "dev\0" = 114, padded to 116
        assert_eq!(&bytes[console + HEADER_LEN..console + HEADER_LEN + 12], b"dev/console\0");
        assert_eq!(field(&bytes, console, 0), 2);
        assert_eq!(field(&bytes, console, 1), 0o020_600);
        assert_eq!((field(&bytes, console, 9), field(&bytes, console, 10)), (5, 1));
        assert_eq!(field(&bytes, console, 6), 0, "a device node has no data");

        let link = console + 124; // 110 + "dev/console\0" = 122, padded to 124
        assert_eq!(&bytes[link + HEADER_LEN..link + HEADER_LEN + 3], b"sh\0");
        assert_eq!(field(&bytes, link, 0), 3);
        assert_eq!(field(&bytes, link, 1), 0o120_777);
        assert_eq!(field(&bytes, link, 6), 12, "the data of a symlink is its target");
        let data = link + 116; // 110 + "sh\0" = 113, padded to 116
        assert_eq!(&bytes[data..data + 12], b"/bin/busybox");
    }

    #[test]
    fn missing_parents_are_added_as_directories_before_the_entry() {
        let mut archive = Initramfs::new();
        archive.add_file("/lib/modules/x.ko", b"", 0o644).unwrap();
        archive.add_file("lib/other", b"", 0o644).unwrap();
        let bytes = archive.finish();
        assert_eq!(names(&bytes), ["lib", "lib/modules", "lib/modules/x.ko", "lib/other", TRAILER]);
        let (modules, _) = entries(&bytes)[1];
        assert_eq!(field(&bytes, modules, 1), 0o040_755);
        assert_eq!(field(&bytes, modules, 0), 2, "parents take inodes in the order they are written");
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let build = || {
            let mut archive = Initramfs::new();
            archive.add_dir("bin", 0o755).unwrap();
            archive.add_file("bin/tool", b"\x7fELF", 0o755).unwrap();
            archive.finish()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn bad_paths_are_rejected() {
        let mut archive = Initramfs::new();
        assert_eq!(archive.add_dir("", 0o755), Err(InitramfsError::EmptyPath(String::new())));
        assert_eq!(archive.add_dir("/", 0o755), Err(InitramfsError::EmptyPath("/".into())));
        assert_eq!(archive.add_dir("./.", 0o755), Err(InitramfsError::EmptyPath("./.".into())));
        assert_eq!(
            archive.add_file("/../etc/passwd", b"", 0o644),
            Err(InitramfsError::ParentComponent("/../etc/passwd".into()))
        );
        assert_eq!(archive.add_file("a/../../b", b"", 0o644), Err(InitramfsError::ParentComponent("a/../../b".into())));
        assert_eq!(archive.add_file("a\0b", b"", 0o644), Err(InitramfsError::NulInPath("a\0b".into())));
        // Nothing was written for the rejected entries.
        assert_eq!(names(&archive.finish()), [TRAILER]);
    }

    #[test]
    fn bad_modes_targets_and_duplicates_are_rejected() {
        let mut archive = Initramfs::new();
        assert_eq!(
            archive.add_file("f", b"", 0o100_644),
            Err(InitramfsError::InvalidMode { path: "f".into(), mode: 0o100_644 })
        );
        assert!(matches!(archive.add_symlink("l", ""), Err(InitramfsError::InvalidTarget { .. })));
        archive.add_file("bin/sh", b"", 0o755).unwrap();
        assert_eq!(archive.add_dir("/bin/", 0o700), Err(InitramfsError::Duplicate("bin".into())));
        assert_eq!(archive.add_symlink("bin/sh", "busybox"), Err(InitramfsError::Duplicate("bin/sh".into())));
        assert_eq!(
            archive.add_file("bin/sh/x", b"", 0o644),
            Err(InitramfsError::ParentNotDirectory { path: "bin/sh/x".into(), parent: "bin/sh".into() })
        );
    }

    #[test]
    fn errors_tell_the_user_what_to_pass_instead() {
        let message = InitramfsError::ParentComponent("/../x".into()).to_string();
        assert!(message.contains("'..'"), "{message}");
        let message = InitramfsError::InvalidMode { path: "f".into(), mode: 0o100_644 }.to_string();
        assert!(message.contains("0o100644") && message.contains("permission bits"), "{message}");
    }

    // ---------------------------------------------------------------- read back with GNU cpio

    /// A directory under the system temp dir that is removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("kvmkit-initramfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs GNU cpio with `archive` on stdin; fails the test if cpio is not installed.
    fn cpio(args: &[&str], dir: &Path, archive: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `cpio` ({e}); this test needs GNU cpio: apt-get install cpio (scripts/bootstrap.sh installs it)")
            });
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "cpio {args:?} failed: {stderr}");
        output
    }

    fn sample() -> Vec<u8> {
        let mut archive = Initramfs::new();
        archive.add_dir("bin", 0o755).unwrap();
        archive.add_file("bin/busybox", &[0x7f, b'E', b'L', b'F', 0, 1, 2, 3, 255], 0o755).unwrap();
        archive.add_symlink("bin/sh", "busybox").unwrap();
        archive.add_file("init", b"#!/bin/sh\necho ready\n", 0o755).unwrap();
        archive.add_dir("tmp", 0o1777).unwrap();
        archive.add_file("etc/motd", b"", 0o600).unwrap();
        archive.add_char_device("dev/console", 5, 1, 0o600).unwrap();
        archive.finish()
    }

    #[test]
    fn gnu_cpio_lists_the_archive() {
        let dir = TempDir::new("list");
        let listing = cpio(&["-t", "--quiet"], &dir.0, &sample());
        let names: Vec<&str> = std::str::from_utf8(&listing.stdout).unwrap().lines().collect();
        assert_eq!(names, ["bin", "bin/busybox", "bin/sh", "init", "tmp", "etc", "etc/motd", "dev", "dev/console"]);

        let verbose = cpio(&["-tv", "--quiet"], &dir.0, &sample());
        let console = String::from_utf8(verbose.stdout).unwrap();
        let console = console.lines().find(|line| line.ends_with("dev/console")).unwrap().to_owned();
        let fields: Vec<&str> = console.split_whitespace().collect();
        assert_eq!(fields[0], "crw-------", "{console}");
        assert_eq!(&fields[4..6], ["5,", "1"], "{console}");
    }

    #[test]
    fn gnu_cpio_extracts_names_modes_contents_and_link_targets() {
        let dir = TempDir::new("extract");
        // Creating device nodes needs privileges, so the console is checked by the listing test.
        cpio(&["-idmv", "--quiet", "--no-absolute-filenames", "-f", "dev/console"], &dir.0, &sample());
        let root = &dir.0;
        let mode = |path: &str| std::fs::symlink_metadata(root.join(path)).unwrap().permissions().mode() & 0o7777;

        assert_eq!(std::fs::read(root.join("bin/busybox")).unwrap(), [0x7f, b'E', b'L', b'F', 0, 1, 2, 3, 255]);
        assert_eq!(mode("bin/busybox"), 0o755);
        assert_eq!(std::fs::read_to_string(root.join("init")).unwrap(), "#!/bin/sh\necho ready\n");
        assert_eq!(mode("init"), 0o755);
        assert_eq!(std::fs::read(root.join("etc/motd")).unwrap(), b"");
        assert_eq!(mode("etc/motd"), 0o600);
        assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), Path::new("busybox"));
        assert!(std::fs::metadata(root.join("tmp")).unwrap().is_dir());
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("etc"), 0o755);
        assert_eq!(std::fs::symlink_metadata(root.join("bin/busybox")).unwrap().mtime(), 0);
        assert!(!root.join("dev/console").exists());
    }
}
