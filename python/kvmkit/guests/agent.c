/*
 * kvmkit-agent: the guest agent of kvmkit's default Linux guest.
 *
 * The guest's /init starts it in the background when the vsock driver is loaded. It listens on
 * vsock port AGENT_PORT (1024), and on the host kvmkit.agent (VM.exec, VM.put_file, VM.get_file)
 * talks to it through the vsock device's Unix socket. Each connection is served by a forked child,
 * so a command that hangs holds up only its own connection. `kvmkit-agent --unix PATH` listens on
 * a Unix socket instead, which lets the host test the agent without a VM. `kvmkit-agent --connect
 * PORT` is a client for the other direction: it connects to the host (CID 2) on vsock port PORT,
 * sends its stdin, half-closes, and copies what the host sends back to stdout until the host
 * closes; it exits 0, or 1 if the connection fails.
 *
 * Build: cc -static -O2 -o kvmkit-agent agent.c (kvmkit.images does it for the default guest).
 *
 * Protocol, version 1. One request per connection, then one reply, then the agent closes the
 * connection. Integers are unsigned 32-bit little-endian (u32); a "string" is a u32 length and
 * that many bytes, with no NUL among them.
 *
 *   request = "KVA1" op:u32 body
 *     op 1, EXEC:  flags:u32 timeout_ms:u32 argc:u32 argv:string[argc] stdin_len:u32 stdin
 *                  flags bit 0 (SHELL): argc is 1 and the string runs through /bin/sh -c;
 *                  otherwise argv[0] is looked up in PATH. timeout_ms 0 means no limit. At most
 *                  4096 arguments of 1 MiB in all (NULs counted).
 *     op 2, PUT:   mode:u32 path:string data_len:u32 data
 *                  Creates or truncates the file, sets its permission bits (mode, at most 07777)
 *                  when it is a regular file, and writes data to it.
 *     op 3, GET:   path:string
 *     Paths are at most 4096 bytes.
 *
 *   reply = frame*, each frame kind:u32 len:u32 payload[len]; the last one is EXIT, DONE or FAIL.
 *     1 STDOUT  (EXEC) output of the command, at most 64 KiB per frame
 *     2 STDERR  (EXEC) likewise for its stderr
 *     3 DATA    (GET)  the file's bytes, at most 64 KiB per frame
 *     4 EXIT    (EXEC) how:u32 code:u32 (len 8). how 0: exited with status code; 1: killed by
 *               signal code; 2: timed out, the command's process group was killed (code 9)
 *     5 DONE    (PUT, GET) success (len 0)
 *     6 FAIL    (any) errno:u32 message (len 4 to 1028, message UTF-8 text). errno 0 means the
 *               request itself was malformed; otherwise an operation in the guest failed with it
 *               (a file that cannot be opened, a program that cannot be executed).
 *
 * A command runs in a new session (so its process group can be killed as one) with stdin, stdout
 * and stderr on pipes; the agent streams stdin from the connection into it while sending its
 * output back, so the client must read the reply while it still sends the request. The reply ends
 * when the command has exited and both its output pipes are closed (a background process that
 * keeps them open keeps the reply open, as with Python's subprocess). If the client closes the
 * connection before that, the command's process group is killed.
 *
 * Nothing a client sends makes the agent buffer more than about 1 MiB per connection or crash: a
 * malformed request gets a FAIL frame and the connection is closed; a client silent for 60 s in
 * the middle of a request, or not reading the reply for 60 s, is dropped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_PORT 1024
#define MAGIC "KVA1"
#define MAGIC_LEN 4

enum { OP_EXEC = 1, OP_PUT = 2, OP_GET = 3 };
enum { FRAME_STDOUT = 1, FRAME_STDERR = 2, FRAME_DATA = 3, FRAME_EXIT = 4, FRAME_DONE = 5, FRAME_FAIL = 6 };
enum { HOW_EXITED = 0, HOW_SIGNALED = 1, HOW_TIMED_OUT = 2 };
#define EXEC_SHELL 1u

#define MAX_ARGC 4096
#define MAX_ARGV_BYTES (1u << 20)
#define MAX_PATH 4096
#define CHUNK (64u << 10)
#define MAX_MESSAGE 1024
#define IDLE_TIMEOUT_S 60
#define MAX_CLIENTS 64
/* After a timeout kill, how long the output pipes may stay open before the reply goes anyway. */
#define KILL_GRACE_MS 1000
/* How often to look for the command's exit where pidfd_open is missing. */
#define REAP_TICK_MS 50

/* --------------------------------------------------------------------- one connection */

static int conn = -1;
static pid_t command_pid;
/* A frame header and the largest payload, so that a frame goes out in one send. */
static unsigned char frame[8 + CHUNK];

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32(const unsigned char *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static int send_all(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = send(conn, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Sends a frame whose payload is already at frame + 8. */
static int send_frame(uint32_t kind, uint32_t len)
{
    put_u32(frame, kind);
    put_u32(frame + 4, len);
    return send_all(frame, 8 + (size_t)len);
}

static void kill_command(void)
{
    if (command_pid > 0) {
        kill(-command_pid, SIGKILL);
        kill(command_pid, SIGKILL);
        while (waitpid(command_pid, NULL, 0) < 0 && errno == EINTR)
            ;
        command_pid = 0;
    }
}

/* The client is gone, or cannot be talked to: end without a reply. */
static void __attribute__((noreturn)) abandon(void)
{
    kill_command();
    _exit(1);
}

/* Replies FAIL (err 0: a malformed request) and ends the connection. */
static void __attribute__((noreturn, format(printf, 2, 3))) fail(int err, const char *fmt, ...)
{
    va_list args;
    kill_command();
    va_start(args, fmt);
    int n = vsnprintf((char *)frame + 12, MAX_MESSAGE + 1, fmt, args);
    va_end(args);
    if (n < 0)
        n = 0;
    if (n > MAX_MESSAGE)
        n = MAX_MESSAGE;
    put_u32(frame + 8, (uint32_t)err);
    send_frame(FRAME_FAIL, 4 + (uint32_t)n);
    _exit(1);
}

/* Reads exactly len request bytes (waiting at most IDLE_TIMEOUT_S for each piece). */
static void recv_all(void *buf, size_t len, const char *what)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = recv(conn, p, len, 0);
        if (n == 0)
            fail(0, "the request ends in %s", what);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                fail(ETIMEDOUT, "the request stalled in %s", what);
            abandon();
        }
        p += n;
        len -= (size_t)n;
    }
}

static uint32_t recv_u32(const char *what)
{
    unsigned char buf[4];
    recv_all(buf, 4, what);
    return get_u32(buf);
}

/* A string of the request as a NUL-terminated copy; longer than max is malformed. */
static char *recv_string(uint32_t max, const char *what)
{
    uint32_t len = recv_u32(what);
    if (len > max)
        fail(0, "%s is %u bytes, more than %u", what, len, max);
    char *s = malloc((size_t)len + 1);
    if (s == NULL)
        fail(ENOMEM, "no memory for %s", what);
    recv_all(s, len, what);
    s[len] = '\0';
    if (memchr(s, '\0', len) != NULL)
        fail(0, "%s contains a NUL byte", what);
    return s;
}

static void set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        fail(errno, "cannot make a pipe non-blocking: %s", strerror(errno));
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* Forks and executes the command with its stdio on pipes; returns after a successful exec. */
static pid_t spawn(const char *file, char **argv, bool shell, int *in_fd, int *out_fd, int *err_fd)
{
    int in[2], out[2], err[2], report[2];
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0
        || pipe2(report, O_CLOEXEC) < 0)
        fail(errno, "cannot make pipes: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        fail(errno, "cannot fork: %s", strerror(errno));
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL); /* an ignored signal would stay ignored across exec */
        signal(SIGCHLD, SIG_DFL);
        setsid();
        if (dup2(in[0], 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0)
            goto failed;
        if (shell)
            execv(file, argv);
        else
            execvp(file, argv);
failed:;
        int e = errno;
        ssize_t ignored = write(report[1], &e, sizeof e);
        (void)ignored;
        _exit(127);
    }
    command_pid = pid;
    close(in[0]);
    close(out[1]);
    close(err[1]);
    close(report[1]);
    /* The report pipe closes on a successful exec, or carries the errno of a failed one. */
    int e = 0;
    ssize_t n;
    while ((n = read(report[0], &e, sizeof e)) < 0 && errno == EINTR)
        ;
    close(report[0]);
    if (n == (ssize_t)sizeof e) {
        close(in[1]);
        close(out[0]);
        close(err[0]);
        kill_command();
        fail(e, "cannot run %s: %s", file, strerror(e));
    }
    *in_fd = in[1];
    *out_fd = out[0];
    *err_fd = err[0];
    return pid;
}

static void run_command(const char *file, char **argv, bool shell, uint32_t input_left, uint32_t timeout_ms)
{
    int stdin_fd, out_fd, err_fd;
    pid_t pid = spawn(file, argv, shell, &stdin_fd, &out_fd, &err_fd);
    set_nonblocking(stdin_fd);
    set_nonblocking(out_fd);
    set_nonblocking(err_fd);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);

    static unsigned char input[CHUNK];
    size_t have = 0, done = 0; /* input[done..have) still goes to the command's stdin */
    bool reaped = false, timed_out = false;
    int status = 0;
    long long deadline = timeout_ms ? now_ms() + timeout_ms : -1;
    long long give_up = -1;

    for (;;) {
        /* All of stdin is through (or the command stopped reading it): the command sees its end. */
        if (stdin_fd >= 0 && input_left == 0 && done == have)
            close_fd(&stdin_fd);
        if (out_fd < 0 && err_fd < 0 && reaped)
            break;

        struct pollfd fds[5];
        int n = 0, i_conn, i_in = -1, i_out = -1, i_err = -1, i_pid = -1;
        /* More stdin is read when there is room for it; otherwise any readable event on the
         * connection is its end (or bytes beyond the request). */
        fds[n] = (struct pollfd){.fd = conn, .events = (input_left == 0 || have == 0) ? POLLIN : 0};
        i_conn = n++;
        if (stdin_fd >= 0 && done < have) {
            fds[n] = (struct pollfd){.fd = stdin_fd, .events = POLLOUT};
            i_in = n++;
        }
        if (out_fd >= 0) {
            fds[n] = (struct pollfd){.fd = out_fd, .events = POLLIN};
            i_out = n++;
        }
        if (err_fd >= 0) {
            fds[n] = (struct pollfd){.fd = err_fd, .events = POLLIN};
            i_err = n++;
        }
        if (!reaped && pidfd >= 0) {
            fds[n] = (struct pollfd){.fd = pidfd, .events = POLLIN};
            i_pid = n++;
        }
        long long wait_ms = -1, now = now_ms();
        if (deadline >= 0 && !timed_out)
            wait_ms = deadline > now ? deadline - now : 0;
        if (give_up >= 0)
            wait_ms = give_up > now ? give_up - now : 0;
        if (!reaped && pidfd < 0 && (wait_ms < 0 || wait_ms > REAP_TICK_MS))
            wait_ms = REAP_TICK_MS;
        if (poll(fds, (nfds_t)n, (int)wait_ms) < 0) {
            if (errno == EINTR)
                continue;
            fail(errno, "poll: %s", strerror(errno));
        }

        now = now_ms();
        if (deadline >= 0 && !timed_out && now >= deadline) {
            timed_out = true;
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            give_up = now + KILL_GRACE_MS;
        }
        if (give_up >= 0 && now >= give_up) {
            /* Something outside the process group holds the pipes: reply with what came. */
            close_fd(&out_fd);
            close_fd(&err_fd);
            if (!reaped) {
                while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                    ;
                reaped = true;
            }
            break;
        }

        short conn_events = fds[i_conn].revents;
        if (conn_events & (POLLERR | POLLHUP))
            abandon();
        if (conn_events & POLLIN) {
            if (input_left == 0) {
                char byte;
                ssize_t got = recv(conn, &byte, 1, MSG_DONTWAIT);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
                    abandon();
                if (got > 0)
                    fail(0, "bytes after the end of the request");
            } else {
                size_t want = input_left < CHUNK ? input_left : CHUNK;
                ssize_t got = recv(conn, input, want, MSG_DONTWAIT);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
                    abandon();
                if (got > 0) {
                    input_left -= (uint32_t)got;
                    /* Input the command stopped reading is dropped, to keep the stream moving. */
                    if (stdin_fd >= 0) {
                        have = (size_t)got;
                        done = 0;
                    }
                }
            }
        }
        if (i_in >= 0 && fds[i_in].revents) {
            ssize_t put = write(stdin_fd, input + done, have - done);
            if (put > 0) {
                done += (size_t)put;
                if (done == have)
                    done = have = 0;
            } else if (put < 0 && errno != EAGAIN && errno != EINTR) {
                close_fd(&stdin_fd); /* EPIPE: the command closed its stdin */
                done = have = 0;
            }
        }
        int *pipes[2] = {&out_fd, &err_fd};
        int slots[2] = {i_out, i_err};
        uint32_t kinds[2] = {FRAME_STDOUT, FRAME_STDERR};
        for (int k = 0; k < 2; k++) {
            if (slots[k] < 0 || !fds[slots[k]].revents)
                continue;
            ssize_t got = read(*pipes[k], frame + 8, CHUNK);
            if (got > 0) {
                if (send_frame(kinds[k], (uint32_t)got) < 0)
                    abandon();
            } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                close_fd(pipes[k]);
            }
        }
        if (!reaped && (pidfd < 0 || (i_pid >= 0 && fds[i_pid].revents))) {
            pid_t r = waitpid(pid, &status, WNOHANG);
            if (r == pid)
                reaped = true;
        }
    }
    command_pid = 0;
    if (pidfd >= 0)
        close(pidfd);
    close_fd(&stdin_fd);

    uint32_t how, code;
    if (timed_out) {
        how = HOW_TIMED_OUT;
        code = SIGKILL;
    } else if (WIFSIGNALED(status)) {
        how = HOW_SIGNALED;
        code = (uint32_t)WTERMSIG(status);
    } else {
        how = HOW_EXITED;
        code = (uint32_t)WEXITSTATUS(status);
    }
    put_u32(frame + 8, how);
    put_u32(frame + 12, code);
    send_frame(FRAME_EXIT, 8);
}

static void serve_exec(void)
{
    uint32_t flags = recv_u32("the exec flags");
    uint32_t timeout_ms = recv_u32("the timeout");
    uint32_t argc = recv_u32("the argument count");
    if (flags & ~EXEC_SHELL)
        fail(0, "unknown exec flags %#x", flags);
    bool shell = flags & EXEC_SHELL;
    if (argc == 0 || argc > MAX_ARGC)
        fail(0, "%u arguments; 1 to %u are allowed", argc, MAX_ARGC);
    if (shell && argc != 1)
        fail(0, "a shell command is one string, not %u", argc);
    char **argv = calloc((size_t)argc + 3, sizeof *argv);
    if (argv == NULL)
        fail(ENOMEM, "no memory for the arguments");
    size_t first = 0, total = 0;
    if (shell) {
        argv[0] = "sh";
        argv[1] = "-c";
        first = 2;
    }
    for (uint32_t i = 0; i < argc; i++) {
        char *arg = recv_string((uint32_t)(MAX_ARGV_BYTES - total), "an argument");
        total += strlen(arg) + 1;
        if (total > MAX_ARGV_BYTES)
            fail(0, "the arguments are more than %u bytes", MAX_ARGV_BYTES);
        argv[first + i] = arg;
    }
    uint32_t input_len = recv_u32("the stdin length");
    run_command(shell ? "/bin/sh" : argv[0], argv, shell, input_len, timeout_ms);
}

static void serve_put(void)
{
    uint32_t mode = recv_u32("the mode");
    if (mode & ~07777u)
        fail(0, "mode %#o has bits beyond 07777", mode);
    char *path = recv_string(MAX_PATH, "the path");
    uint32_t left = recv_u32("the data length");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, mode);
    if (fd < 0)
        fail(errno, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    /* open leaves an existing file's mode alone and applies the umask to a new one. */
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && fchmod(fd, mode) < 0)
        fail(errno, "cannot set the mode of %s: %s", path, strerror(errno));
    while (left > 0) {
        size_t want = left < CHUNK ? left : CHUNK;
        recv_all(frame + 8, want, "the file data");
        left -= (uint32_t)want;
        for (size_t done = 0; done < want;) {
            ssize_t n = write(fd, frame + 8 + done, want - done);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                fail(errno, "cannot write %s: %s", path, strerror(errno));
            }
            done += (size_t)n;
        }
    }
    if (close(fd) < 0)
        fail(errno, "cannot write %s: %s", path, strerror(errno));
    send_frame(FRAME_DONE, 0);
}

static void serve_get(void)
{
    char *path = recv_string(MAX_PATH, "the path");
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        fail(errno, "cannot open %s: %s", path, strerror(errno));
    for (;;) {
        ssize_t n = read(fd, frame + 8, CHUNK);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail(errno, "cannot read %s: %s", path, strerror(errno));
        }
        if (n == 0)
            break;
        if (send_frame(FRAME_DATA, (uint32_t)n) < 0)
            abandon();
    }
    close(fd);
    send_frame(FRAME_DONE, 0);
}

static void serve(int fd)
{
    conn = fd;
    struct timeval idle = {.tv_sec = IDLE_TIMEOUT_S};
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
    setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &idle, sizeof idle);
    unsigned char magic[MAGIC_LEN];
    recv_all(magic, MAGIC_LEN, "the magic number");
    if (memcmp(magic, MAGIC, MAGIC_LEN) != 0)
        fail(0, "not a kvmkit-agent request (bad magic number)");
    uint32_t op = recv_u32("the operation");
    switch (op) {
    case OP_EXEC:
        serve_exec();
        break;
    case OP_PUT:
        serve_put();
        break;
    case OP_GET:
        serve_get();
        break;
    default:
        fail(0, "unknown operation %u", op);
    }
}

/* --------------------------------------------------------------------- the listener */

static void on_child(int sig)
{
    (void)sig; /* only interrupts accept, so that the loop reaps */
}

static int listen_on(const char *unix_path)
{
    int fd;
    if (unix_path != NULL) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        if (strlen(unix_path) >= sizeof addr.sun_path) {
            fprintf(stderr, "kvmkit-agent: socket path too long: %s\n", unix_path);
            return -1;
        }
        strcpy(addr.sun_path, unix_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(fd, 16) == 0)
            return fd;
    } else {
        struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = AGENT_PORT};
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(fd, 16) == 0)
            return fd;
    }
    int e = errno;
    if (fd >= 0)
        close(fd);
    errno = e;
    return -1;
}

/* Copies everything readable from `from` to `to`; false on EOF or an error. */
static bool pump(int from, int to)
{
    char buf[16384];
    ssize_t n = read(from, buf, sizeof buf);
    if (n <= 0)
        return false;
    for (ssize_t done = 0; done < n;) {
        ssize_t w = write(to, buf + done, (size_t)(n - done));
        if (w <= 0)
            return false;
        done += w;
    }
    return true;
}

/* The --connect client: stdin to the host's vsock port, its answer to stdout. */
static int connect_to_host(const char *port_text)
{
    char *end;
    unsigned long port = strtoul(port_text, &end, 10);
    if (*port_text == '\0' || *end != '\0' || port > UINT32_MAX) {
        fprintf(stderr, "kvmkit-agent: not a port number: %s\n", port_text);
        return 2;
    }
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = (unsigned)port};
    int sock = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
        fprintf(stderr, "kvmkit-agent: cannot connect to the host's port %lu: %s\n", port, strerror(errno));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct pollfd fds[2] = {{.fd = STDIN_FILENO, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (fds[0].revents && !pump(STDIN_FILENO, sock)) {
            shutdown(sock, SHUT_WR);
            fds[0].fd = -1; /* poll ignores it from now on */
        }
        if (fds[1].revents && !pump(sock, STDOUT_FILENO))
            return 0;
    }
}

int main(int argc, char **argv)
{
    const char *unix_path = NULL;
    if (argc == 3 && strcmp(argv[1], "--connect") == 0)
        return connect_to_host(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--unix") == 0) {
        unix_path = argv[2];
    } else if (argc != 1) {
        fprintf(stderr, "usage: kvmkit-agent [--unix PATH | --connect PORT]\n");
        return 2;
    }
    /* Pipes must not take descriptors 0-2, or a command's dup2 onto them would be a no-op. */
    int null_fd;
    do
        null_fd = open("/dev/null", O_RDWR);
    while (null_fd >= 0 && null_fd <= 2);
    if (null_fd >= 0)
        close(null_fd);
    if (unix_path == NULL)
        setsid(); /* no signals from the console */
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_child}; /* no SA_RESTART */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);

    int listener = -1;
    /* The vsock transport may still be settling when /init starts the agent. */
    for (int attempt = 0; attempt < 50 && listener < 0; attempt++) {
        listener = listen_on(unix_path);
        if (listener < 0)
            usleep(100 * 1000);
    }
    if (listener < 0) {
        fprintf(stderr, "kvmkit-agent: cannot listen on %s: %s\n",
                unix_path ? unix_path : "vsock port 1024", strerror(errno));
        return 1;
    }

    int clients = 0;
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            clients--;
        if (clients >= MAX_CLIENTS) {
            if (waitpid(-1, NULL, 0) > 0)
                clients--;
            continue;
        }
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED)
                usleep(100 * 1000); /* out of descriptors or memory: let children finish */
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(listener);
            signal(SIGCHLD, SIG_DFL);
            serve(fd);
            _exit(0);
        }
        if (pid > 0)
            clients++;
        close(fd);
    }
}
