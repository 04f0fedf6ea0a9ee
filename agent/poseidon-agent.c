/*
 * poseidon-agent: the first process of every runner sandbox.
 *
 * bubblewrap starts it as root inside the sandbox (namespaces, cgroup, mounts and cwd /workspace
 * already made). It serves the daemon over its stdin (requests) and stdout (events), so file
 * operations need no process at all and an execution needs exactly one fork+exec.
 *
 * FRAMES (both directions): u32 LE length-of-rest | u8 type | u32 LE id | payload
 *   length-of-rest = 5 + payload length. Integers are little endian.
 *   "bytes" = u32 length + that many bytes; "str" = bytes without NUL.
 *   Ids are chosen by the daemon; one id names one operation (execution or request).
 *
 * REQUESTS (daemon -> agent)
 *   0x01 EXEC    u8 flags | u32 uid | u32 gid | str cwd | u32 argc | argc*str | u32 envc | envc*str("K=V")
 *                flags bit0 = privileged. Privileged keeps only KEPT_CAPS (needs uid 0: a non-zero uid
 *                loses every capability, as the kernel does on setuid). Answered by events below, or
 *                RESULT(status != 0) if it could not be started.
 *                flags bit2 = tty: stdin and stdout are a pseudo-terminal (80x24), the controlling
 *                terminal of the execution's session, as Poseidon's executions get from Docker's
 *                exec with a TTY; its output comes as STDOUT. stderr stays a pipe whose "\n" the
 *                agent sends as "\r\n" (Poseidon reads it from a FIFO through a second TTY exec),
 *                unless flags bit3 = tty stderr puts stderr on the terminal too.
 *   0x02 STDIN   raw data for the execution's stdin; empty payload closes it (on a terminal: the
 *                terminal's EOF character, ^D, is written instead, which ends a read at line start).
 *   0x03 KILL    (empty) SIGKILL to the execution's process group; for a READ, cancels it (RESULT ECANCELED).
 *   0x04 FILES   u32 ndelete | ndelete*str | u32 ncopy | ncopy*(u8 isDirectory | str path | bytes content)
 *                -> RESULT. Deletes first (the entry "./" "*" = every non-dot entry of /workspace), then copies.
 *                Every path of FILES, LIST and READ is resolved inside the sandbox's root, never through a
 *                /proc magic link; only regular files and directories are written (see file operations).
 *   0x05 LIST    u8 flags | u32 uid | u32 gid | u32 maxEntries | u32 maxBytes | str path
 *                flags bit0 privileged, bit1 recursive
 *                -> LISTING* then RESULT. Unprivileged requests check access as uid/gid (setfsuid).
 *                Past maxEntries entries or maxBytes bytes of listing: RESULT E2BIG, the rest unlisted.
 *   0x06 READ    u8 flags | u32 uid | u32 gid | str path   flags bit0 privileged
 *                -> FILE_SIZE, DATA*, RESULT(0); or RESULT(status != 0) only.
 *   0x07 PAUSE   (empty) stop reading the output of that execution / the data of that READ
 *   0x08 RESUME  (empty) go on. Per operation, so one slow consumer never stalls the others.
 *   0x09 DISCARD (empty) the daemon is done with that execution: its later output (of background
 *                processes holding the pipes) is read and dropped; no more events for that id.
 *
 * EVENTS (agent -> daemon)
 *   0x80 READY          u32 protocol version (3); id 0; sent once at start
 *   0x81 STDOUT         raw data
 *   0x82 STDERR         raw data
 *   0x83 EXIT           u32 code: exit status, or 128 + signal number; after the output the
 *                       process wrote before it ended (held back while paused, sent on RESUME)
 *   0x84 OUTPUT_CLOSED  (empty) stdout and stderr both reached EOF (may come before or after EXIT)
 *   0x85 RESULT         u32 status (0 = ok, else an errno value) | UTF-8 message
 *   0x86 LISTING        raw bytes; concatenated, per entry 8 NUL-terminated fields as GNU
 *                       find -printf '%y\0%s\0%T@\0%M\0%u\0%g\0%p\0%l\0'; at most CHUNK bytes per
 *                       event, which may end inside an entry
 *   0x87 FILE_SIZE      u64 size
 *   0x88 DATA           raw file bytes
 *
 * When stdin reaches EOF (the daemon is gone) the agent kills all its executions and exits; the
 * sandbox's pid namespace, and with it everything left in it, dies with it.
 *
 * Single-threaded: one poll() loop; SIGCHLD arrives through a signalfd. Events are written with a
 * blocking loop: if the daemon stops reading, the agent blocks, which is the intended backpressure.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "errno-text.h"
#include "frame-reader.h"

enum { REQ_EXEC = 1, REQ_STDIN, REQ_KILL, REQ_FILES, REQ_LIST, REQ_READ, REQ_PAUSE, REQ_RESUME, REQ_DISCARD };
enum { EV_READY = 0x80, EV_STDOUT, EV_STDERR, EV_EXIT, EV_OUTPUT_CLOSED, EV_RESULT, EV_LISTING, EV_FILE_SIZE, EV_DATA };
#define FLAG_PRIVILEGED 1u
#define FLAG_RECURSIVE 2u
#define FLAG_TTY 4u
#define FLAG_TTY_STDERR 8u
#define TTY_ROWS 24
#define TTY_COLS 80

#define PROTOCOL_VERSION 3u
#define MAX_FRAME (1u << 30)   /* a FILES request carries whole submissions, but not more than this */
#define STDIN_CAP (1u << 20)   /* stdin buffered for a child that does not read; the excess is dropped */
#define CHUNK 65536            /* one read of output or file data, one event */
#define DRAIN_LIMIT 16         /* reads per stream when a child exits, so a chatty orphan cannot hold us */
#define WORKSPACE "/workspace"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* What a privileged execution keeps: those of a default container, minus the risky ones. */
static const int KEPT_CAPS[] = { CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_NET_BIND_SERVICE };
#define NKEPT (sizeof KEPT_CAPS / sizeof KEPT_CAPS[0])

struct exec {
	uint32_t id;
	pid_t pid;                  /* also the id of its process group (the child calls setsid) */
	int in_fd, out_fd, err_fd;  /* our ends; -1 once closed */
	char *in_buf;               /* stdin not yet taken by the child */
	size_t in_len;
	int in_close;               /* close stdin once in_buf is written */
	int exited, closed_sent, paused, done;
	int exit_pending;           /* reaped, EXIT not sent yet: it waits for the output read first */
	uint32_t exit_code;
	int discard;                /* DISCARD: output is read and dropped, no more events */
	int tty;                    /* in_fd is a duplicate of the terminal's master, out_fd the master */
	int err_crlf;               /* stderr pipe of a tty execution: "\n" goes out as "\r\n" */
	uint8_t veof;               /* the terminal's EOF character, written when stdin is closed */
};

struct reader {
	uint32_t id;
	int fd;
	uint64_t left;
	int paused, done;
};

static struct exec **execs;
static size_t nexecs;
static struct reader **readers;
static size_t nreaders;

/* ---------- events ---------- */

static void kill_all_and_exit(int status)
{
	for (size_t i = 0; i < nexecs; i++) {
		kill(-execs[i]->pid, SIGKILL);
		kill(execs[i]->pid, SIGKILL); /* in case it died before its setsid() */
	}
	_exit(status);
}

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; p[2] = (v >> 16) & 0xff; p[3] = (uint8_t)(v >> 24);
}

/* Writes one event: header, then up to two payload parts, blocking until all is written. */
static void send_event2(uint8_t type, uint32_t id, const void *a, size_t alen, const void *b, size_t blen)
{
	uint8_t header[9];
	put_u32(header, (uint32_t)(5 + alen + blen));
	header[4] = type;
	put_u32(header + 5, id);
	struct iovec iov[3] = { { header, 9 }, { (void *)a, alen }, { (void *)b, blen } };
	struct iovec *v = iov;
	int n = 3;
	while (n > 0) {
		ssize_t w = writev(1, v, n);
		if (w < 0) {
			if (errno == EINTR) continue;
			kill_all_and_exit(1); /* the daemon is gone */
		}
		while (n > 0 && (size_t)w >= v->iov_len) { w -= (ssize_t)v->iov_len; v++; n--; }
		if (n > 0) { v->iov_base = (char *)v->iov_base + w; v->iov_len -= (size_t)w; }
	}
}

static void send_event(uint8_t type, uint32_t id, const void *data, size_t len)
{
	send_event2(type, id, data, len, NULL, 0);
}

static void send_u32(uint8_t type, uint32_t id, uint32_t value)
{
	uint8_t b[4];
	put_u32(b, value);
	send_event(type, id, b, 4);
}

static void send_result(uint32_t id, uint32_t status, const char *format, ...)
{
	char message[4096] = "";
	if (format) {
		va_list ap;
		va_start(ap, format);
		vsnprintf(message, sizeof message, format, ap);
		va_end(ap);
	}
	uint8_t b[4];
	put_u32(b, status);
	send_event2(EV_RESULT, id, b, 4, message, strlen(message));
}

/* ---------- request payload decoding ---------- */

struct cursor {
	const uint8_t *p;
	size_t n;
	int bad;
};

static uint32_t get_u32(struct cursor *c)
{
	if (c->n < 4) { c->bad = 1; c->n = 0; return 0; }
	uint32_t v = c->p[0] | (uint32_t)c->p[1] << 8 | (uint32_t)c->p[2] << 16 | (uint32_t)c->p[3] << 24;
	c->p += 4; c->n -= 4;
	return v;
}

static uint8_t get_u8(struct cursor *c)
{
	if (c->n < 1) { c->bad = 1; return 0; }
	c->n--;
	return *c->p++;
}

static const uint8_t *get_bytes(struct cursor *c, size_t *len)
{
	*len = get_u32(c);
	if (c->bad || *len > c->n) { c->bad = 1; c->n = 0; *len = 0; return (const uint8_t *)""; }
	const uint8_t *p = c->p;
	c->p += *len; c->n -= *len;
	return p;
}

/* A NUL-terminated copy; a NUL inside would silently cut a path or argument, so it is an error. */
static char *get_str(struct cursor *c)
{
	size_t len;
	const uint8_t *p = get_bytes(c, &len);
	if (memchr(p, 0, len)) c->bad = 1;
	char *s = malloc(len + 1);
	if (!s) kill_all_and_exit(3);
	memcpy(s, p, len);
	s[len] = 0;
	return s;
}

/* ---------- bookkeeping ---------- */

static struct exec *find_exec(uint32_t id)
{
	for (size_t i = 0; i < nexecs; i++)
		if (execs[i]->id == id && !execs[i]->done) return execs[i];
	return NULL;
}

static struct reader *find_reader(uint32_t id)
{
	for (size_t i = 0; i < nreaders; i++)
		if (readers[i]->id == id && !readers[i]->done) return readers[i];
	return NULL;
}

static void *grow(void *array, size_t count)
{
	void *p = realloc(array, (count + 1) * sizeof(void *));
	if (!p) kill_all_and_exit(3);
	return p;
}

static void close_fd(int *fd)
{
	if (*fd >= 0) close(*fd);
	*fd = -1;
}

/* An execution is over for us once it was reaped and its output ended; both are reported first. */
static void check_finished(struct exec *e)
{
	if (e->out_fd < 0 && e->err_fd < 0 && !e->closed_sent) {
		e->closed_sent = 1;
		if (!e->discard) send_event(EV_OUTPUT_CLOSED, e->id, NULL, 0);
	}
	if (e->exited && !e->exit_pending && e->closed_sent) {
		e->done = 1;

		close_fd(&e->in_fd);
	}
}

/* Removes finished entries; only done at the end of a loop iteration, so no pointer dangles. */
static void sweep(void)
{
	size_t j = 0;
	for (size_t i = 0; i < nexecs; i++) {
		if (execs[i]->done) { free(execs[i]->in_buf); free(execs[i]); }
		else execs[j++] = execs[i];
	}
	nexecs = j;
	j = 0;
	for (size_t i = 0; i < nreaders; i++) {
		if (readers[i]->done) { close_fd(&readers[i]->fd); free(readers[i]); }
		else readers[j++] = readers[i];
	}
	nreaders = j;
}

/* ---------- executions ---------- */

/*
 * A terminal's master hands out at most what its line discipline buffers (4 KiB, often less) per
 * read: it is read until CHUNK is full or nothing is left, so a fast writer costs the daemon one
 * event per 64 KiB where it can, as with a pipe. A master whose slave is closed everywhere (or hung
 * up as the session leader exited) answers EIO: that is its EOF.
 */
static int forward_terminal(struct exec *e)
{
	static char buf[CHUNK];
	size_t got = 0;
	int open = 1;
	while (got < sizeof buf) {
		ssize_t n = read(e->out_fd, buf + got, sizeof buf - got);
		if (n > 0) { got += (size_t)n; continue; }
		if (n < 0 && errno == EINTR) continue;
		if (n == 0 || errno != EAGAIN) open = 0;
		break;
	}
	if (got > 0 && !e->discard) send_event(EV_STDOUT, e->id, buf, got);
	if (!open) {
		close_fd(&e->out_fd);
		check_finished(e);
		return 0;
	}
	return got > 0;
}

/* Reads one chunk of a child's stdout or stderr; EOF closes our end. */
static int forward_output(struct exec *e, int *fd, uint8_t type)
{
	static char buf[CHUNK];
	static char crlf[2 * CHUNK];
	if (e->tty && fd == &e->out_fd) return forward_terminal(e);
	ssize_t n = read(*fd, buf, sizeof buf);
	if (n > 0) {
		if (e->discard) return 1;
		if (type == EV_STDERR && e->err_crlf) {
			/* What a terminal's ONLCR does, so stderr ends lines as stdout does (Poseidon's stderr
			 * comes through a TTY too); such an event may carry up to 2 * CHUNK bytes. */
			size_t m = 0;
			for (ssize_t i = 0; i < n; i++) {
				if (buf[i] == '\n') crlf[m++] = '\r';
				crlf[m++] = buf[i];
			}
			send_event(type, e->id, crlf, m);
		} else {
			send_event(type, e->id, buf, (size_t)n);
		}
		return 1;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
	close_fd(fd);
	check_finished(e);
	return 0;
}

static void flush_stdin(struct exec *e)
{
	while (e->in_fd >= 0 && e->in_len > 0) {
		ssize_t w = write(e->in_fd, e->in_buf, e->in_len);
		if (w < 0) {
			if (errno == EINTR) continue;
			if (errno == EAGAIN) return;
			/* EPIPE: the child stopped reading stdin; what it never reads is dropped. */
			e->in_len = 0;
			close_fd(&e->in_fd);
			return;
		}
		memmove(e->in_buf, e->in_buf + w, e->in_len - (size_t)w);
		e->in_len -= (size_t)w;
	}
	if (e->in_close && e->in_len == 0) close_fd(&e->in_fd);
}

static void handle_stdin(uint32_t id, const uint8_t *data, size_t len)
{
	struct exec *e = find_exec(id);
	if (!e || e->in_fd < 0) return; /* already closed or over: like writing to a closed pipe */
	if (len == 0 && e->tty) {
		/* A terminal has no end of its own: its EOF character makes the reader's read() return
		 * what the line holds, or 0 (EOF) at the start of a line. Then stdin takes no more. */
		if (e->in_len < STDIN_CAP) {
			if (!e->in_buf) e->in_buf = malloc(STDIN_CAP);
			if (!e->in_buf) kill_all_and_exit(3);
			e->in_buf[e->in_len++] = (char)e->veof;
		}
		e->in_close = 1;
	} else if (len == 0) {
		e->in_close = 1;
	} else {
		if (len > STDIN_CAP - e->in_len) len = STDIN_CAP - e->in_len;
		if (!e->in_buf) e->in_buf = malloc(STDIN_CAP);
		if (!e->in_buf) kill_all_and_exit(3);
		memcpy(e->in_buf + e->in_len, data, len);
		e->in_len += len;
	}
	flush_stdin(e);
}

static int cap_is_kept(int cap)
{
	for (size_t i = 0; i < NKEPT; i++)
		if (KEPT_CAPS[i] == cap) return 1;
	return 0;
}

/* In the child: gives up everything the execution must not have. Returns the failing step, or NULL. */
static const char *drop_privileges(int privileged, uid_t uid, gid_t gid)
{
	/* bwrap --cap-add puts the agent's caps in the ambient set; a child must not inherit them. */
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL) return "clear ambient capabilities";
	/* The bounding set limits what any later execve (of a setuid file, say) can ever grant. */
	for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
		if (!(privileged && cap_is_kept(cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) return "drop bounding set";
	struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2];
	if (syscall(SYS_capget, &header, data) < 0) return "capget";
	data[0].inheritable = data[1].inheritable = 0;
	if (privileged) {
		/* root's execve makes permitted = bounding set; reduce it now too, so nothing is "gained". */
		uint64_t kept = 0;
		for (size_t i = 0; i < NKEPT; i++) kept |= 1ull << KEPT_CAPS[i];
		data[0].permitted = data[0].effective = (uint32_t)kept;
		data[1].permitted = data[1].effective = (uint32_t)(kept >> 32);
	}
	if (syscall(SYS_capset, &header, data) < 0) return "capset";
	if (setgroups(0, NULL) < 0) return "setgroups";
	if (setresgid(gid, gid, gid) < 0) return "setresgid";
	/* From uid 0 to a non-zero uid, the kernel clears the permitted, effective and ambient sets. */
	if (setresuid(uid, uid, uid) < 0) return "setresuid";
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return "no_new_privs";
	return NULL;
}

static const char *env_get(char **envp, const char *name)
{
	size_t n = strlen(name);
	for (; *envp; envp++)
		if (strncmp(*envp, name, n) == 0 && (*envp)[n] == '=') return *envp + n + 1;
	return NULL;
}

/* execvpe would search the agent's PATH; the execution's own PATH is the one that counts. */
static void exec_search(char **argv, char **envp)
{
	if (strchr(argv[0], '/')) { execve(argv[0], argv, envp); return; }
	const char *path = env_get(envp, "PATH");
	if (!path) path = DEFAULT_PATH;
	int denied = 0;
	char candidate[4096];
	for (const char *p = path;; p++) {
		const char *end = strchrnul(p, ':');
		int len = snprintf(candidate, sizeof candidate, "%.*s%s%s", (int)(end - p), p, end == p ? "" : "/", argv[0]);
		if (len > 0 && (size_t)len < sizeof candidate) {
			execve(candidate, argv, envp);
			if (errno == EACCES) denied = 1;
		}
		if (!*end) break;
		p = end;
	}
	errno = denied ? EACCES : ENOENT;
}

static _Noreturn void child_main(int in, int out, int err, int tty, int privileged, uid_t uid, gid_t gid, const char *cwd, char **argv, char **envp)
{
	const char *step = NULL;
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL); /* the agent blocks SIGCHLD for its signalfd */
	for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL); /* SIGPIPE is ignored in the agent */
	/* A session and process group of its own: KILL reaches the whole tree of this execution. */
	setsid();
	/* The terminal becomes the session's controlling terminal: ^C, ^\\ and ^Z signal its foreground
	 * process group, /dev/tty works, and the session leader's exit hangs it up, as in a container.
	 * Done as root, before the privileges are dropped; the slave was opened by the agent. */
	if (tty && ioctl(in, TIOCSCTTY, 0) < 0) { step = "make the terminal the controlling one"; goto fail; }
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) _exit(127);
	if (syscall(SYS_close_range, 3u, ~0u, 0u) < 0)
		for (int fd = 3; fd < 65536; fd++) close(fd);
	/*
	 * The spawner lowers the agent's OOM score where the host allows it (CAP_SYS_RESOURCE); learner
	 * code is raised above the agent's in any case, which needs no privilege, so the OOM killer picks
	 * it first even on hosts that withhold that capability (there both would otherwise sit at 0).
	 */
	static const char learner_oom_score_adj[] = "500";
	int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, learner_oom_score_adj, sizeof learner_oom_score_adj - 1) != (ssize_t)(sizeof learner_oom_score_adj - 1)) { step = "raise oom_score_adj"; goto fail; }
	close(fd);
	if (chdir(cwd) < 0) { step = cwd; goto fail; }
	if ((step = drop_privileges(privileged, uid, gid))) goto fail;
	exec_search(argv, envp);
	step = argv[0];
fail:
	dprintf(2, "poseidon-agent: %s: %s\n", step, errno_text(errno));
	_exit(127);
}

static void handle_exec(uint32_t id, struct cursor *c)
{
	uint8_t flags = get_u8(c);
	uint32_t uid = get_u32(c), gid = get_u32(c);
	char *cwd = get_str(c);
	uint32_t argc = get_u32(c);
	if (argc > c->n / 4) c->bad = 1;
	char **argv = calloc((c->bad ? 0 : argc) + 1, sizeof *argv);
	for (uint32_t i = 0; !c->bad && i < argc; i++) argv[i] = get_str(c);
	uint32_t envc = get_u32(c);
	if (envc > c->n / 4) c->bad = 1;
	char **envp = calloc((c->bad ? 0 : envc) + 1, sizeof *envp);
	for (uint32_t i = 0; !c->bad && i < envc; i++) envp[i] = get_str(c);
	int pipes[3][2] = { { -1, -1 }, { -1, -1 }, { -1, -1 } };
	int master = -1, slave = -1, master_in = -1;
	int tty = (flags & FLAG_TTY) != 0, tty_stderr = tty && (flags & FLAG_TTY_STDERR);
	uint8_t veof = 4; /* ^D, what a new terminal has */

	if (!argv || !envp) kill_all_and_exit(3);
	if (c->bad || c->n != 0 || argc == 0) { send_result(id, EINVAL, "malformed EXEC request"); goto out; }
	if (find_exec(id) || find_reader(id)) { send_result(id, EEXIST, "id %u is in use", id); goto out; }
	if (tty) {
		/*
		 * The sandbox's own devpts instance (bwrap --dev): /dev/ptmx -> pts/ptmx. TIOCGPTPEER opens
		 * the slave through the master, never by a path under /dev/pts that learner code could
		 * have replaced. Opened here, as root, so the learner's uid needs no access to open it;
		 * it is still handed to the learner (as login does), so that its programs may reopen it.
		 */
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || unlockpt(master) < 0 || (slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
			send_result(id, (uint32_t)errno, "cannot create a terminal: %s", errno_text(errno));
			goto out;
		}
		struct winsize size = { .ws_row = TTY_ROWS, .ws_col = TTY_COLS };
		struct termios termios;
		if (ioctl(master, TIOCSWINSZ, &size) < 0 || tcgetattr(slave, &termios) < 0
		    || (!(flags & FLAG_PRIVILEGED) && fchown(slave, uid, gid) < 0) || fchmod(slave, 0620) < 0
		    || (master_in = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0) {
			send_result(id, (uint32_t)errno, "cannot set up the terminal: %s", errno_text(errno));
			goto out;
		}
		veof = termios.c_cc[VEOF];
	}
	for (int i = tty ? 2 : 0; i < (tty_stderr ? 2 : 3); i++)
		if (pipe2(pipes[i], O_CLOEXEC) < 0) { send_result(id, (uint32_t)errno, "cannot create pipes: %s", errno_text(errno)); goto out; }
	pid_t pid = fork();
	if (pid < 0) { send_result(id, (uint32_t)errno, "cannot start the command: %s", errno_text(errno)); goto out; }
	if (pid == 0) {
		if (tty) child_main(slave, slave, tty_stderr ? slave : pipes[2][1], 1, flags & FLAG_PRIVILEGED, uid, gid, cwd, argv, envp);
		child_main(pipes[0][0], pipes[1][1], pipes[2][1], 0, flags & FLAG_PRIVILEGED, uid, gid, cwd, argv, envp);
	}

	struct exec *e = calloc(1, sizeof *e);
	if (!e) kill_all_and_exit(3);
	e->id = id;
	e->pid = pid;
	e->tty = tty;
	e->err_crlf = tty && !tty_stderr;
	e->veof = veof;
	if (tty) {
		/* Our slave closes below, so that the child's last close (or the hangup) ends the output. */
		e->in_fd = master_in; master_in = -1;
		e->out_fd = master; master = -1;
	} else {
		e->in_fd = pipes[0][1]; pipes[0][1] = -1;
		e->out_fd = pipes[1][0]; pipes[1][0] = -1;
	}
	e->err_fd = pipes[2][0]; pipes[2][0] = -1;
	/* Never block on one child: its pipes are non-blocking and only touched when poll says so. */
	fcntl(e->in_fd, F_SETFL, O_NONBLOCK);
	fcntl(e->out_fd, F_SETFL, O_NONBLOCK);
	if (e->err_fd >= 0) fcntl(e->err_fd, F_SETFL, O_NONBLOCK);
	execs = grow(execs, nexecs);
	execs[nexecs++] = e;
out:
	for (int i = 0; i < 3; i++) { close_fd(&pipes[i][0]); close_fd(&pipes[i][1]); }
	close_fd(&master);
	close_fd(&slave);
	close_fd(&master_in);
	free(cwd);
	for (uint32_t i = 0; argv && argv[i]; i++) free(argv[i]);
	for (uint32_t i = 0; envp && envp[i]; i++) free(envp[i]);
	free(argv);
	free(envp);
}

/*
 * What the child wrote before it died is read out and sent before its EXIT: the daemon counts
 * output after EXIT as a background process's and stops waiting for it after a short silence, so
 * the process's own last output must never come after it. While the daemon has us paused, the
 * EXIT waits for its RESUME (or DISCARD), and the reading then happens first.
 */
static void report_exit(struct exec *e)
{
	for (int i = 0; i < DRAIN_LIMIT && e->out_fd >= 0 && forward_output(e, &e->out_fd, EV_STDOUT); i++) {}
	for (int i = 0; i < DRAIN_LIMIT && e->err_fd >= 0 && forward_output(e, &e->err_fd, EV_STDERR); i++) {}
	e->exit_pending = 0;
	send_u32(EV_EXIT, e->id, e->exit_code);
	check_finished(e);
}

static void reap_children(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		struct exec *e = NULL;
		for (size_t i = 0; i < nexecs; i++)
			if (execs[i]->pid == pid && !execs[i]->exited) e = execs[i];
		if (!e) continue;
		e->exited = 1;
		e->exit_pending = 1;
		e->exit_code = WIFEXITED(status) ? (uint32_t)WEXITSTATUS(status) : 128u + (uint32_t)WTERMSIG(status);
		if (!e->paused) report_exit(e);
	}
}

/* ---------- file operations ---------- */

/*
 * Confinement. Every path of FILES, LIST and READ is resolved with openat2(RESOLVE_IN_ROOT |
 * RESOLVE_NO_MAGICLINKS) against a descriptor of the sandbox's "/": ".." and absolute symlinks
 * stop at the sandbox's root, and /proc magic links (/proc/<pid>/root, /proc/<pid>/fd/<n>), which
 * lead wherever a process's root or file is, are refused.
 *
 * Why "/" and not /workspace is the root, for relative paths too: the sandbox's root is the only
 * boundary there is (an absolute path names any file of the sandbox, as in Poseidon, and
 * privileged requests are meant to). A symlink made by learner code must mean what it means to
 * the learner's own programs: with /workspace as the root, "ln -s /dev d" would silently become
 * /workspace/dev. So a relative path is /workspace/<path>, resolved like any other.
 *
 * What a path leads to inside the sandbox may still be a host inode (bubblewrap binds /dev/null,
 * /dev/full... from the host), so only regular files and directories are ever created, written,
 * chowned or chmodded, and always through a descriptor opened without following a final link and
 * checked with fstat first.
 *
 * Trees are walked with one descriptor per level and openat() relative to it, never with a path
 * string, so depth and path length (beyond PATH_MAX) cost heap memory, not stack, and work.
 */

#define RESOLVE_FLAGS (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)

static int sandbox_root(void)
{
	static int fd = -1;
	if (fd < 0) fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) kill_all_and_exit(4);
	return fd;
}

/* openat2 inside the sandbox's root; EAGAIN means a concurrent rename raced the lookup: try again. */
static int open_in_root(const char *path, int flags, mode_t mode)
{
	struct open_how how = { .flags = (uint64_t)(flags | O_CLOEXEC), .mode = (flags & O_CREAT) ? mode : 0, .resolve = RESOLVE_FLAGS };
	int fd = -1;
	for (int attempt = 0; attempt < 64; attempt++) {
		fd = (int)syscall(SYS_openat2, sandbox_root(), path, &how, sizeof how);
		if (fd >= 0 || errno != EAGAIN) break;
	}
	return fd;
}

/* Relative paths are under /workspace; the result is absolute, for open_in_root. */
static char *resolve(const char *path)
{
	char *full;
	if (asprintf(&full, "%s%s%s", path[0] == '/' ? "" : WORKSPACE, path[0] == '/' ? "" : "/", path) < 0) kill_all_and_exit(3);
	return full;
}

/*
 * Splits an absolute path in place into its parent and last component, trailing slashes dropped
 * ("dir/" names dir). The last component is "" for "/" itself.
 */
static void split_path(char *full, const char **parent, const char **name)
{
	size_t n = strlen(full);
	while (n > 1 && full[n - 1] == '/') full[--n] = 0;
	char *slash = strrchr(full, '/');
	if (!slash) { *parent = "."; *name = full; return; }
	if (slash == full) { *parent = "/"; *name = slash + 1; return; }
	*slash = 0;
	*parent = full;
	*name = slash + 1;
}

static int is_dot_or_dotdot(const char *name)
{
	return strcmp(name, ".") == 0 || strcmp(name, "..") == 0;
}

/* The first failure of a FILES request: its errno and a message naming the path. */
static int op_errno;
static char op_message[4096];

static int fail_with(int e, const char *format, ...)
{
	va_list ap;
	va_start(ap, format);
	vsnprintf(op_message, sizeof op_message, format, ap);
	va_end(ap);
	op_errno = e;
	return -1;
}

static int fail_errno(const char *what, const char *path)
{
	int e = errno;
	return fail_with(e, "cannot %s %s: %s", what, path, errno_text(e));
}

/* The d_type-less way: getdents64 straight into a buffer, so a directory needs no DIR (32 KiB each). */
struct dirent64_raw {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

static char dents[CHUNK];

struct buffer { char *data; size_t len, cap; };

static void buffer_add(struct buffer *b, const void *data, size_t len)
{
	if (b->len + len > b->cap) {
		size_t cap = b->cap ? b->cap : CHUNK;
		while (cap < b->len + len) cap *= 2;
		char *p = realloc(b->data, cap);
		if (!p) kill_all_and_exit(3);
		b->data = p;
		b->cap = cap;
	}
	memcpy(b->data + b->len, data, len);
	b->len += len;
}


/*
 * rm -rf of name in dir: never follows a symlink, a missing entry is fine. Depth-first with a
 * stack of directory descriptors; a directory is read again from its start after each
 * subdirectory, which sees only what is left, since everything before it was removed.
 */
struct remove_level { int fd; char *name; };

static int remove_at(int dir, const char *name, const char *shown)
{
	struct stat st;
	if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) < 0) return errno == ENOENT ? 0 : fail_errno("delete", shown);
	if (!S_ISDIR(st.st_mode)) {
		if (unlinkat(dir, name, 0) < 0 && errno != ENOENT) return fail_errno("delete", shown);
		return 0;
	}
	struct remove_level *stack = NULL;
	size_t depth = 0, cap = 0;
	int r = 0;
	int top = openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (top < 0) return errno == ENOENT ? 0 : fail_errno("delete", shown);
	cap = 16;
	stack = malloc(cap * sizeof *stack);
	if (!stack) kill_all_and_exit(3);
	stack[depth++] = (struct remove_level){ top, strdup(name) };
	while (depth > 0 && r == 0) {
		struct remove_level *level = &stack[depth - 1];
		int descended = 0;
		if (lseek(level->fd, 0, SEEK_SET) < 0) { r = fail_errno("delete", shown); break; }
		for (;;) {
			long n = syscall(SYS_getdents64, level->fd, dents, sizeof dents);
			if (n < 0) { r = fail_errno("delete", shown); break; }
			if (n == 0) break;
			for (long off = 0; off < n && !descended && r == 0;) {
				struct dirent64_raw *d = (struct dirent64_raw *)(dents + off);
				off += d->d_reclen;
				if (is_dot_or_dotdot(d->d_name)) continue;
				if (fstatat(level->fd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
					if (errno != ENOENT) r = fail_errno("delete", shown);
					continue;
				}
				if (!S_ISDIR(st.st_mode)) {
					if (unlinkat(level->fd, d->d_name, 0) < 0 && errno != ENOENT) r = fail_errno("delete", shown);
					continue;
				}
				int child = openat(level->fd, d->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
				if (child < 0) {
					if (errno == EMFILE) r = fail_with(EMFILE, "cannot delete %s: the tree is too deep", shown);
					else if (errno != ENOENT) r = fail_errno("delete", shown);
					continue;
				}
				if (depth == cap) {
					cap *= 2;
					struct remove_level *p = realloc(stack, cap * sizeof *stack);
					if (!p) kill_all_and_exit(3);
					stack = p;
				}
				char *copy = strdup(d->d_name);
				if (!copy) kill_all_and_exit(3);
				stack[depth++] = (struct remove_level){ child, copy };
				descended = 1;
			}
			if (descended || r != 0) break;
		}
		if (descended || r != 0) continue;
		/* Read to its end without a subdirectory: empty now, so remove it from its parent. */
		level = &stack[depth - 1];
		int parent = depth > 1 ? stack[depth - 2].fd : dir;
		close(level->fd);
		if (unlinkat(parent, level->name, AT_REMOVEDIR) < 0 && errno != ENOENT) r = fail_errno("delete", shown);
		free(level->name);
		depth--;
	}
	while (depth > 0) { depth--; close(stack[depth].fd); free(stack[depth].name); }
	free(stack);
	return r;
}

/* One entry of FILES' delete list: the glob "./" "*" (every non-dot entry of /workspace) or a path. */
static int delete_entry(const char *entry)
{
	if (strcmp(entry, "./*") == 0) {
		/* Poseidon's glob over the workspace: like the shell's, it spares dotfiles, and it takes the
		 * names first, so files that learner code keeps making cannot keep it going forever. */
		int dir = open_in_root(WORKSPACE, O_RDONLY | O_DIRECTORY, 0);
		if (dir < 0) return fail_errno("delete", WORKSPACE "/*");
		struct buffer names = { 0 };
		long n;
		while ((n = syscall(SYS_getdents64, dir, dents, sizeof dents)) > 0)
			for (long off = 0; off < n;) {
				struct dirent64_raw *d = (struct dirent64_raw *)(dents + off);
				off += d->d_reclen;
				if (d->d_name[0] != '.') buffer_add(&names, d->d_name, strlen(d->d_name) + 1);
			}
		int r = n < 0 ? fail_errno("delete", WORKSPACE "/*") : 0;
		for (size_t off = 0; off < names.len && r == 0; off += strlen(names.data + off) + 1) {
			char shown[PATH_MAX];
			snprintf(shown, sizeof shown, "%s/%s", WORKSPACE, names.data + off);
			r = remove_at(dir, names.data + off, shown);
		}
		free(names.data);
		close(dir);
		return r;
	}
	char *full = resolve(entry);
	const char *parent, *name;
	split_path(full, &parent, &name);
	int r = 0;
	if (name[0] == 0 || is_dot_or_dotdot(name)) r = fail_with(EINVAL, "cannot delete %s: Invalid argument", entry);
	else {
		/* Links in the parent are followed, inside the root only: as "rm -rf link/x" would, in the sandbox. */
		int dir = open_in_root(parent, O_PATH | O_DIRECTORY, 0);
		if (dir < 0) r = (errno == ENOENT || errno == ENOTDIR) ? 0 : fail_errno("delete", entry);
		else {
			r = remove_at(dir, name, entry);
			close(dir);
		}
	}
	free(full);
	return r;
}

/*
 * The directory name in dir, mode 01777 and owner root: created so, or (given) made so if it
 * exists as a directory. Returns its descriptor, or -1.
 */
static int make_directory_at(int dir, const char *name, int fix_existing, const char *shown)
{
	int created = mkdirat(dir, name, 01777) == 0;
	if (!created && errno != EEXIST) return fail_errno("write", shown);
	struct stat st;
	/* O_NOFOLLOW: an existing link named like the directory is not the directory. */
	int fd = openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 && (errno == ENOTDIR || errno == ELOOP)) return fail_with(ENOTDIR, "cannot write %s: not a directory", shown);
	if (fd < 0) return fail_errno("write", shown);
	if (fstat(fd, &st) < 0 || !S_ISDIR(st.st_mode)) { close(fd); return fail_with(ENOTDIR, "cannot write %s: not a directory", shown); }
	/* mkdir applies the umask; the owner of a new one is already root, the agent's uid. */
	if ((created || fix_existing) && ((!created && fchown(fd, 0, 0) < 0) || fchmod(fd, 01777) < 0)) {
		int e = errno;
		close(fd);
		errno = e;
		return fail_errno("write", shown);
	}
	return fd;
}

/* The parent directory of a copy, missing ones created (01777, root): a descriptor, or -1. */
static int open_parent(const char *parent, const char *shown)
{
	int fd = open_in_root(parent, O_PATH | O_DIRECTORY, 0);
	if (fd >= 0 || errno != ENOENT) return fd >= 0 ? fd : fail_errno("write", shown);
	/* Some are missing: walk down, each step resolved in the root so links mean what they mean. */
	char *prefix = strdup(parent);
	if (!prefix) kill_all_and_exit(3);
	fd = open_in_root("/", O_PATH | O_DIRECTORY, 0);
	for (char *p = prefix + 1; fd >= 0 && *p;) {
		char *end = strchrnul(p, '/');
		char saved = *end;
		*end = 0;
		int next = open_in_root(prefix, O_PATH | O_DIRECTORY, 0);
		if (next < 0 && errno == ENOENT && !is_dot_or_dotdot(p)) next = make_directory_at(fd, p, 0, shown);
		else if (next < 0) next = fail_errno("write", shown);
		close(fd);
		fd = next;
		*end = saved;
		p = saved ? end + 1 : end;
	}
	free(prefix);
	return fd;
}

static int write_all(int fd, const uint8_t *data, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, data, len);
		if (w < 0) {
			if (errno == EINTR) continue;
			return -1;
		}
		data += w;
		len -= (size_t)w;
	}
	return 0;
}

/* A regular file name in dir with the content, mode 0744, owner root; anything else there is refused. */
static int write_file_at(int dir, const char *name, const uint8_t *data, size_t len, const char *shown)
{
	struct stat before, st;
	int fd;
	if (fstatat(dir, name, &before, AT_SYMLINK_NOFOLLOW) == 0) {
		/* Looked at before it is opened: opening a device can itself do something. */
		if (S_ISDIR(before.st_mode)) return fail_with(EISDIR, "cannot write %s: %s", shown, errno_text(EISDIR));
		if (!S_ISREG(before.st_mode)) return fail_with(EINVAL, "cannot write %s: not a regular file", shown);
		/* O_NONBLOCK: should a FIFO have taken its place, the open must not hang (it is refused below). */
		fd = openat(dir, name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	} else if (errno == ENOENT) {
		fd = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0744);
		if (fd >= 0 && fstat(fd, &before) < 0) { close(fd); return fail_errno("write", shown); }
	} else return fail_errno("write", shown);
	if (fd < 0 && errno == ELOOP) return fail_with(EINVAL, "cannot write %s: not a regular file", shown);
	if (fd < 0) return fail_errno("write", shown);
	if (fstat(fd, &st) < 0) { close(fd); return fail_errno("write", shown); }
	if (!S_ISREG(st.st_mode) || st.st_dev != before.st_dev || st.st_ino != before.st_ino) {
		close(fd);
		return fail_with(EINVAL, "cannot write %s: not a regular file", shown);
	}
	/* Back to blocking writes; an existing file keeps owner and mode otherwise: make it a fresh copy's. */
	if (fcntl(fd, F_SETFL, 0) < 0 || ftruncate(fd, 0) < 0 || fchown(fd, 0, 0) < 0 || fchmod(fd, 0744) < 0 || write_all(fd, data, len) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return fail_errno("write", shown);
	}
	if (close(fd) < 0) return fail_errno("write", shown);
	return 0;
}

static int copy_entry(const char *path, int is_directory, const uint8_t *content, size_t len)
{
	char *full = resolve(path);
	const char *parent, *name;
	split_path(full, &parent, &name);
	int r = 0;
	if (name[0] == 0) r = fail_with(EISDIR, "cannot write %s: %s", path, errno_text(EISDIR));
	else if (is_dot_or_dotdot(name)) r = fail_with(EINVAL, "cannot write %s: %s", path, errno_text(EINVAL));
	else {
		int dir = open_parent(parent, path);
		if (dir < 0) r = -1;
		else if (is_directory) {
			int fd = make_directory_at(dir, name, 1, path);
			if (fd < 0) r = -1;
			else close(fd);
		} else r = write_file_at(dir, name, content, len, path);
		if (dir >= 0) close(dir);
	}
	free(full);
	return r;
}

static void handle_files(uint32_t id, struct cursor *c)
{
	/* Validate the whole request before changing anything. */
	struct cursor check = *c;
	uint32_t ndelete = get_u32(&check);
	for (uint32_t i = 0; i < ndelete && !check.bad; i++) free(get_str(&check));
	uint32_t ncopy = get_u32(&check);
	for (uint32_t i = 0; i < ncopy && !check.bad; i++) {
		size_t len;
		get_u8(&check);
		free(get_str(&check));
		get_bytes(&check, &len);
	}
	if (check.bad || check.n != 0) { send_result(id, EINVAL, "malformed FILES request"); return; }

	get_u32(c);
	for (uint32_t i = 0; i < ndelete; i++) {
		char *entry = get_str(c);
		int r = delete_entry(entry);
		free(entry);
		if (r < 0) { send_result(id, (uint32_t)op_errno, "%s", op_message); return; }
	}
	get_u32(c);
	for (uint32_t i = 0; i < ncopy; i++) {
		uint8_t is_directory = get_u8(c);
		char *path = get_str(c);
		size_t len;
		const uint8_t *content = get_bytes(c, &len);
		int r = copy_entry(path, is_directory, content, len);
		free(path);
		if (r < 0) { send_result(id, (uint32_t)op_errno, "%s", op_message); return; }
	}
	send_result(id, 0, NULL);
}

/* Unprivileged listing and reading check access as the learner: setfsuid drops the fs capabilities. */
static void enter_identity(uint8_t flags, uint32_t uid, uint32_t gid)
{
	if (flags & FLAG_PRIVILEGED) return;
	setfsgid(gid);
	setfsuid(uid);
}

static void leave_identity(void)
{
	setfsuid(0); /* back to fsuid 0 restores the fs capabilities from the permitted set */
	setfsgid(0);
}

struct name { uint32_t id; char *name; };
struct names { struct name *items; size_t n; };
static struct names users, groups;

/* /etc/passwd and /etc/group of the sandbox; libc's getpwuid would need NSS, absent from a static binary. */
static void load_names(struct names *names, const char *file)
{
	for (size_t i = 0; i < names->n; i++) free(names->items[i].name);
	free(names->items);
	names->items = NULL;
	names->n = 0;
	/* Resolved in the root like every path: learner code may have replaced it with a link. */
	int fd = open_in_root(file, O_RDONLY | O_NONBLOCK, 0);
	struct stat st;
	if (fd >= 0 && (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))) { close(fd); fd = -1; }
	FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
	if (!f) { if (fd >= 0) close(fd); return; }
	char line[1024];
	/* A huge file made by privileged code must not make every listing slow or large. */
	for (int lines = 0; lines < 10000 && fgets(line, sizeof line, f); lines++) {
		char *name = line, *colon1 = strchr(line, ':'), *colon2 = colon1 ? strchr(colon1 + 1, ':') : NULL;
		if (!colon2) continue;
		*colon1 = 0;
		char *end;
		unsigned long id = strtoul(colon2 + 1, &end, 10);
		if (end == colon2 + 1 || *end != ':') continue;
		struct name *p = realloc(names->items, (names->n + 1) * sizeof *p);
		if (!p) break;
		names->items = p;
		names->items[names->n].id = (uint32_t)id;
		names->items[names->n].name = strdup(name);
		if (names->items[names->n].name) names->n++;
	}
	fclose(f);
}

static const char *name_of(struct names *names, uint32_t id, char numeric[16])
{
	for (size_t i = 0; i < names->n; i++)
		if (names->items[i].id == id) return names->items[i].name;
	snprintf(numeric, 16, "%u", id);
	return numeric;
}

static void buffer_field(struct buffer *b, const char *s)
{
	buffer_add(b, s, strlen(s) + 1);
}

static void mode_string(mode_t m, char s[11])
{
	s[0] = S_ISDIR(m) ? 'd' : S_ISLNK(m) ? 'l' : S_ISFIFO(m) ? 'p' : S_ISSOCK(m) ? 's' : S_ISCHR(m) ? 'c' : S_ISBLK(m) ? 'b' : '-';
	for (int i = 0; i < 9; i++) s[1 + i] = (m & (0400u >> i)) ? "rwxrwxrwx"[i] : '-';
	if (m & S_ISUID) s[3] = s[3] == 'x' ? 's' : 'S';
	if (m & S_ISGID) s[6] = s[6] == 'x' ? 's' : 'S';
	if (m & S_ISVTX) s[9] = s[9] == 'x' ? 't' : 'T';
	s[10] = 0;
}

/* A directory being listed: its descriptor, where to go on reading it, and its path's length. */
struct list_level { int fd; int64_t next; size_t path_len; };

struct listing {
	uint32_t id;
	int recursive;
	uint32_t max_entries, max_bytes;
	uint32_t entries;
	uint64_t bytes;
	struct buffer entry, out;
	char *path;
	size_t path_len, path_cap;
};

static void path_set(struct listing *l, size_t base, const char *name)
{
	size_t n = strlen(name);
	int slash = base > 0 && l->path[base - 1] != '/';
	if (base + slash + n + 1 > l->path_cap) {
		l->path_cap = (base + slash + n + 1) * 2;
		char *p = realloc(l->path, l->path_cap);
		if (!p) kill_all_and_exit(3);
		l->path = p;
	}
	if (slash) l->path[base] = '/';
	memcpy(l->path + base + slash, name, n + 1);
	l->path_len = base + slash + n;
}

/*
 * One entry as find -printf prints it, streamed in LISTING events of at most CHUNK bytes (an
 * event may end inside an entry). Returns -1 past a cap, with the RESULT left to the caller.
 */
static int list_emit(struct listing *l, int dir, const char *name, const struct stat *st)
{
	char field[64], mode[11], numeric[16], target[4096] = "";
	struct buffer *b = &l->entry;
	b->len = 0;
	buffer_field(b, S_ISDIR(st->st_mode) ? "d" : S_ISLNK(st->st_mode) ? "l" : S_ISFIFO(st->st_mode) ? "p" : S_ISSOCK(st->st_mode) ? "s" : S_ISCHR(st->st_mode) ? "c" : S_ISBLK(st->st_mode) ? "b" : "f");
	snprintf(field, sizeof field, "%lld", (long long)st->st_size);
	buffer_field(b, field);
	snprintf(field, sizeof field, "%lld.%09ld", (long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec);
	buffer_field(b, field);
	mode_string(st->st_mode, mode);
	buffer_field(b, mode);
	buffer_field(b, name_of(&users, st->st_uid, numeric));
	buffer_field(b, name_of(&groups, st->st_gid, numeric));
	buffer_add(b, l->path, l->path_len + 1);
	if (S_ISLNK(st->st_mode)) {
		ssize_t n = readlinkat(dir, name, target, sizeof target - 1);
		target[n > 0 ? n : 0] = 0;
	}
	buffer_field(b, target);
	if (l->entries >= l->max_entries) return -1;
	if (l->bytes + b->len > l->max_bytes) return -1;
	l->entries++;
	l->bytes += b->len;
	buffer_add(&l->out, b->data, b->len);
	size_t sent = 0;
	while (l->out.len - sent >= CHUNK) { send_event(EV_LISTING, l->id, l->out.data + sent, CHUNK); sent += CHUNK; }
	memmove(l->out.data, l->out.data + sent, l->out.len - sent);
	l->out.len -= sent;
	return 0;
}

/*
 * Like find (without following links), depth first, the start first; an unreadable directory is
 * reported by its entry and skipped, as find goes on. Returns -1 past a cap.
 */
static int list_tree(struct listing *l, int start)
{
	struct list_level *stack = malloc(16 * sizeof *stack);
	size_t depth = 0, cap = 16;
	int r = 0;
	if (!stack) kill_all_and_exit(3);
	stack[depth++] = (struct list_level){ start, 0, l->path_len };
	while (depth > 0 && r == 0) {
		struct list_level *level = &stack[depth - 1];
		int descended = 0;
		long n = lseek(level->fd, level->next, SEEK_SET) < 0 ? -1 : syscall(SYS_getdents64, level->fd, dents, sizeof dents);
		for (long off = 0; n > 0 && off < n && !descended && r == 0;) {
			struct dirent64_raw *d = (struct dirent64_raw *)(dents + off);
			off += d->d_reclen;
			level->next = d->d_off;
			if (is_dot_or_dotdot(d->d_name)) continue;
			struct stat st;
			if (fstatat(level->fd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue; /* gone meanwhile */
			path_set(l, level->path_len, d->d_name);
			if (list_emit(l, level->fd, d->d_name, &st) < 0) { r = -1; break; }
			if (!S_ISDIR(st.st_mode) || !l->recursive) continue;
			int child = openat(level->fd, d->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (child < 0) continue;
			if (depth == cap) {
				cap *= 2;
				struct list_level *p = realloc(stack, cap * sizeof *stack);
				if (!p) kill_all_and_exit(3);
				stack = p;
			}
			stack[depth++] = (struct list_level){ child, 0, l->path_len };
			descended = 1;
		}
		if (descended || r != 0) continue;
		if (n <= 0) { /* read to its end (or unreadable): back to the parent */
			depth--;
			if (depth > 0) close(stack[depth].fd);
		}
	}
	while (depth > 1) close(stack[--depth].fd);
	free(stack);
	return r;
}

static void handle_list(uint32_t id, struct cursor *c)
{
	uint8_t flags = get_u8(c);
	uint32_t uid = get_u32(c), gid = get_u32(c);
	uint32_t max_entries = get_u32(c), max_bytes = get_u32(c);
	char *path = get_str(c);
	if (c->bad || c->n != 0) { send_result(id, EINVAL, "malformed LIST request"); free(path); return; }
	load_names(&users, "/etc/passwd");
	load_names(&groups, "/etc/group");
	struct listing l = { .id = id, .recursive = (flags & FLAG_RECURSIVE) != 0, .max_entries = max_entries, .max_bytes = max_bytes, .path = path, .path_len = strlen(path) };
	l.path_cap = l.path_len + 1;
	char *full = resolve(path);
	enter_identity(flags, uid, gid);
	/* Like find: the start itself is not followed if it is a link, unless the path ends in "/". */
	size_t n = strlen(full);
	int follow = n > 0 && full[n - 1] == '/';
	int fd = open_in_root(full, O_PATH | (follow ? 0 : O_NOFOLLOW), 0);
	struct stat st;
	int r = fd < 0 || fstat(fd, &st) < 0 ? -1 : 0, e = errno, capped = 0;
	if (r == 0) {
		/* readlinkat(fd, "") reads the link an O_PATH|O_NOFOLLOW descriptor stands for. */
		if (list_emit(&l, fd, "", &st) < 0) capped = 1;
		else if (S_ISDIR(st.st_mode)) {
			int dir = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
			if (dir < 0) { r = -1; e = errno; }
			else {
				capped = list_tree(&l, dir) < 0;
				close(dir);
			}
		}
	}
	if (fd >= 0) close(fd);
	leave_identity();
	if (capped) {
		/* What was sent is incomplete: the daemon drops it on this RESULT. */
		if (l.entries >= l.max_entries) send_result(id, E2BIG, "the listing has more than %u entries", l.max_entries);
		else send_result(id, E2BIG, "the listing has more than %u bytes", l.max_bytes);
	} else {
		if (l.out.len > 0) send_event(EV_LISTING, id, l.out.data, l.out.len);
		if (r < 0) send_result(id, (uint32_t)e, "cannot list %s: %s", path, errno_text(e));
		else send_result(id, 0, NULL);
	}
	free(l.out.data);
	free(l.entry.data);
	free(l.path);
	free(full);
}

static void handle_read(uint32_t id, struct cursor *c)
{
	uint8_t flags = get_u8(c);
	uint32_t uid = get_u32(c), gid = get_u32(c);
	char *path = get_str(c);
	if (c->bad || c->n != 0) { send_result(id, EINVAL, "malformed READ request"); free(path); return; }
	if (find_exec(id) || find_reader(id)) { send_result(id, EEXIST, "id %u is in use", id); free(path); return; }
	char *full = resolve(path);
	enter_identity(flags, uid, gid);
	/* Looked at before it is opened (opening a device can do something), links followed inside the root. */
	struct stat before, st;
	int fd = open_in_root(full, O_PATH, 0);
	int e = errno, regular = 1;
	if (fd >= 0) {
		if (fstat(fd, &before) < 0) e = errno;
		else if (!S_ISREG(before.st_mode)) regular = 0;
		close(fd);
		/* O_NONBLOCK: should a FIFO have taken its place meanwhile, the open must not hang. */
		fd = regular ? open_in_root(full, O_RDONLY | O_NONBLOCK | O_NOCTTY, 0) : -1;
		if (regular && fd < 0) e = errno;
	}
	leave_identity();
	if (fd >= 0 && fstat(fd, &st) < 0) { e = errno; close_fd(&fd); }
	if (fd >= 0 && (!S_ISREG(st.st_mode) || st.st_dev != before.st_dev || st.st_ino != before.st_ino)) { regular = 0; close_fd(&fd); }
	if (!regular) send_result(id, EINVAL, "cannot read %s: not a regular file", path);
	else if (fd < 0) send_result(id, (uint32_t)e, "cannot read %s: %s", path, errno_text(e));
	free(full);
	free(path);
	if (fd < 0) return;
	fcntl(fd, F_SETFL, 0);
	struct reader *r = calloc(1, sizeof *r);
	if (!r) kill_all_and_exit(3);
	r->id = id;
	r->fd = fd;
	r->left = (uint64_t)st.st_size; /* never more than announced: the size is the Content-Length */
	uint8_t size[8];
	for (int i = 0; i < 8; i++) size[i] = (uint8_t)(r->left >> (8 * i));
	send_event(EV_FILE_SIZE, id, size, 8);
	readers = grow(readers, nreaders);
	readers[nreaders++] = r;
}

/* One chunk per reader per loop iteration, so a large download does not starve executions. */
static void advance_reader(struct reader *r)
{
	static char buf[CHUNK];
	ssize_t n = read(r->fd, buf, r->left < sizeof buf ? (size_t)r->left : sizeof buf);
	if (n < 0 && errno == EINTR) return;
	if (n < 0) { send_result(r->id, (uint32_t)errno, "cannot read: %s", errno_text(errno)); r->done = 1; return; }
	if (n > 0) send_event(EV_DATA, r->id, buf, (size_t)n);
	r->left -= (uint64_t)n;
	if (n == 0 || r->left == 0) { send_result(r->id, 0, NULL); r->done = 1; }
}

/* ---------- requests ---------- */

static void handle_frame(uint8_t type, uint32_t id, const uint8_t *payload, size_t len)
{
	struct cursor c = { payload, len, 0 };
	struct exec *e;
	struct reader *r;
	switch (type) {
	case REQ_EXEC: handle_exec(id, &c); break;
	case REQ_STDIN: handle_stdin(id, payload, len); break;
	case REQ_KILL:
		if ((e = find_exec(id))) { kill(-e->pid, SIGKILL); kill(e->pid, SIGKILL); }
		if ((r = find_reader(id))) { send_result(id, ECANCELED, "cancelled"); r->done = 1; }
		break;
	case REQ_FILES: handle_files(id, &c); break;
	case REQ_LIST: handle_list(id, &c); break;
	case REQ_READ: handle_read(id, &c); break;
	case REQ_PAUSE:
	case REQ_RESUME:
		if ((e = find_exec(id)) && !e->discard) {
			e->paused = type == REQ_PAUSE;
			if (e->exit_pending && !e->paused) report_exit(e);
		}
		if ((r = find_reader(id))) r->paused = type == REQ_PAUSE;
		break;
	case REQ_DISCARD:
		/*
		 * Read and dropped rather than our ends closed: closing would kill background writers with
		 * SIGPIPE (or block them, unread, if paused), yet they must run on as they did, and their
		 * files and processes stay for the next execution. Reading 64 KiB at a time costs the agent
		 * far less than the writer, and nothing is framed, sent or decoded. The entry goes once
		 * both pipes reach EOF and the process was reaped.
		 */
		if ((e = find_exec(id))) {
			e->discard = 1;
			e->paused = 0;
			if (e->exit_pending) report_exit(e);
			check_finished(e);
		}
		break;
	default: send_result(id, EINVAL, "unknown request type %u", type);
	}
}

static struct frame_reader requests = { .chunk = CHUNK, .max_frame = MAX_FRAME };

/* Reads what the daemon sent and handles every complete frame. */
static void read_requests(void)
{
	int rc = frame_reader_read(&requests, 0, handle_frame);
	if (rc == FRAMES_EOF) kill_all_and_exit(0); /* the daemon is gone: nobody may run unsupervised */
	if (rc == FRAMES_BAD) {
		fprintf(stderr, "poseidon-agent: bad frame length %u\n", requests.bad_length);
		kill_all_and_exit(2);
	}
	if (rc == FRAMES_NO_MEMORY) kill_all_and_exit(3);
}

int main(void)
{
	/* The spawner handed us our own binary (fd 3) and bubblewrap its data; none is for learners. */
	if (syscall(SYS_close_range, 3u, ~0u, 0u) < 0)
		for (int fd = 3; fd < 1024; fd++) close(fd);
	/* A child that closed its stdin must give EPIPE, not kill the agent. */
	signal(SIGPIPE, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigfd < 0) { perror("poseidon-agent: signalfd"); return 1; }
	/* Privileged learner code runs as root too: non-dumpable keeps it out of our memory and /proc files. */
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	/* No supplementary groups, so unprivileged access checks (setfsuid) see only the learner's gid. */
	setgroups(0, NULL);
	if (chdir(WORKSPACE) < 0) { perror("poseidon-agent: chdir " WORKSPACE); return 1; }
	fcntl(0, F_SETFL, fcntl(0, F_GETFL) & ~O_NONBLOCK);
	fcntl(1, F_SETFL, fcntl(1, F_GETFL) & ~O_NONBLOCK);
	send_u32(EV_READY, 0, PROTOCOL_VERSION);

	struct pollfd *fds = NULL;
	struct exec **owners = NULL; /* the execution each pollfd from index 2 on belongs to */
	for (;;) {
		size_t max = 2 + 3 * nexecs, n = 2;
		fds = realloc(fds, max * sizeof *fds);
		owners = realloc(owners, max * sizeof *owners);
		if (!fds || !owners) kill_all_and_exit(3);
		fds[0] = (struct pollfd){ 0, POLLIN, 0 };
		fds[1] = (struct pollfd){ sigfd, POLLIN, 0 };
		for (size_t i = 0; i < nexecs; i++) {
			struct exec *e = execs[i];
			if (!e->paused && e->out_fd >= 0) { owners[n] = e; fds[n++] = (struct pollfd){ e->out_fd, POLLIN, 0 }; }
			if (!e->paused && e->err_fd >= 0) { owners[n] = e; fds[n++] = (struct pollfd){ e->err_fd, POLLIN, 0 }; }
			if (e->in_fd >= 0 && e->in_len > 0) { owners[n] = e; fds[n++] = (struct pollfd){ e->in_fd, POLLOUT, 0 }; }
		}
		int busy = 0;
		for (size_t i = 0; i < nreaders; i++) busy |= !readers[i]->paused;
		if (poll(fds, n, busy ? 0 : -1) < 0) {
			if (errno == EINTR) continue;
			perror("poseidon-agent: poll");
			kill_all_and_exit(1);
		}
		for (size_t i = 2; i < n; i++) {
			struct exec *e = owners[i];
			if (!fds[i].revents) continue;
			if (fds[i].fd == e->out_fd) forward_output(e, &e->out_fd, EV_STDOUT);
			else if (fds[i].fd == e->err_fd) forward_output(e, &e->err_fd, EV_STDERR);
			else if (fds[i].fd == e->in_fd) flush_stdin(e);
		}
		if (fds[1].revents) {
			struct signalfd_siginfo info;
			while (read(sigfd, &info, sizeof info) == sizeof info) {}
			reap_children();
		}
		for (size_t i = 0; i < nreaders; i++)
			if (!readers[i]->paused && !readers[i]->done) advance_reader(readers[i]);
		if (fds[0].revents) read_requests();
		sweep();
	}
}
