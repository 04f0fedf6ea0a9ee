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
 *   0x02 STDIN   raw data for the execution's stdin; empty payload closes it.
 *   0x03 KILL    (empty) SIGKILL to the execution's process group; for a READ, cancels it (RESULT ECANCELED).
 *   0x04 FILES   u32 ndelete | ndelete*str | u32 ncopy | ncopy*(u8 isDirectory | str path | bytes content)
 *                -> RESULT. Deletes first (the entry "./" "*" = every non-dot entry of /workspace), then copies.
 *   0x05 LIST    u8 flags | u32 uid | u32 gid | str path   flags bit0 privileged, bit1 recursive
 *                -> LISTING* then RESULT. Unprivileged requests check access as uid/gid (setfsuid).
 *   0x06 READ    u8 flags | u32 uid | u32 gid | str path   flags bit0 privileged
 *                -> FILE_SIZE, DATA*, RESULT(0); or RESULT(status != 0) only.
 *   0x07 PAUSE   (empty) stop reading the output of that execution / the data of that READ
 *   0x08 RESUME  (empty) go on. Per operation, so one slow consumer never stalls the others.
 *
 * EVENTS (agent -> daemon)
 *   0x80 READY          u32 protocol version (1); id 0; sent once at start
 *   0x81 STDOUT         raw data
 *   0x82 STDERR         raw data
 *   0x83 EXIT           u32 code: exit status, or 128 + signal number
 *   0x84 OUTPUT_CLOSED  (empty) stdout and stderr both reached EOF (may come before or after EXIT)
 *   0x85 RESULT         u32 status (0 = ok, else an errno value) | UTF-8 message
 *   0x86 LISTING        raw bytes; concatenated, per entry 8 NUL-terminated fields as GNU
 *                       find -printf '%y\0%s\0%T@\0%M\0%u\0%g\0%p\0%l\0'
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
#include <ftw.h>
#include <grp.h>
#include <linux/capability.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "frame-reader.h"

enum { REQ_EXEC = 1, REQ_STDIN, REQ_KILL, REQ_FILES, REQ_LIST, REQ_READ, REQ_PAUSE, REQ_RESUME };
enum { EV_READY = 0x80, EV_STDOUT, EV_STDERR, EV_EXIT, EV_OUTPUT_CLOSED, EV_RESULT, EV_LISTING, EV_FILE_SIZE, EV_DATA };
#define FLAG_PRIVILEGED 1u
#define FLAG_RECURSIVE 2u

#define PROTOCOL_VERSION 1u
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
		send_event(EV_OUTPUT_CLOSED, e->id, NULL, 0);
	}
	if (e->exited && e->closed_sent) {
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

/* Reads one chunk of a child's stdout or stderr; EOF closes our end. */
static int forward_output(struct exec *e, int *fd, uint8_t type)
{
	static char buf[CHUNK];
	ssize_t n = read(*fd, buf, sizeof buf);
	if (n > 0) { send_event(type, e->id, buf, (size_t)n); return 1; }
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
	if (len == 0) {
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

static _Noreturn void child_main(int in, int out, int err, int privileged, uid_t uid, gid_t gid, const char *cwd, char **argv, char **envp)
{
	const char *step = NULL;
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL); /* the agent blocks SIGCHLD for its signalfd */
	for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL); /* SIGPIPE is ignored in the agent */
	/* A session and process group of its own: KILL reaches the whole tree of this execution. */
	setsid();
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) _exit(127);
	if (syscall(SYS_close_range, 3u, ~0u, 0u) < 0)
		for (int fd = 3; fd < 65536; fd++) close(fd);
	/* The daemon protects the agent from the OOM killer; the learner's processes must stay killable. */
	int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "0", 1) != 1) { step = "reset oom_score_adj"; goto fail; }
	close(fd);
	if (chdir(cwd) < 0) { step = cwd; goto fail; }
	if ((step = drop_privileges(privileged, uid, gid))) goto fail;
	exec_search(argv, envp);
	step = argv[0];
fail:
	dprintf(2, "poseidon-agent: %s: %s\n", step, strerror(errno));
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

	if (!argv || !envp) kill_all_and_exit(3);
	if (c->bad || c->n != 0 || argc == 0) { send_result(id, EINVAL, "malformed EXEC request"); goto out; }
	if (find_exec(id) || find_reader(id)) { send_result(id, EEXIST, "id %u is in use", id); goto out; }
	for (int i = 0; i < 3; i++)
		if (pipe2(pipes[i], O_CLOEXEC) < 0) { send_result(id, (uint32_t)errno, "cannot create pipes: %s", strerror(errno)); goto out; }
	pid_t pid = fork();
	if (pid < 0) { send_result(id, (uint32_t)errno, "cannot start the command: %s", strerror(errno)); goto out; }
	if (pid == 0) child_main(pipes[0][0], pipes[1][1], pipes[2][1], flags & FLAG_PRIVILEGED, uid, gid, cwd, argv, envp);

	struct exec *e = calloc(1, sizeof *e);
	if (!e) kill_all_and_exit(3);
	e->id = id;
	e->pid = pid;
	e->in_fd = pipes[0][1]; pipes[0][1] = -1;
	e->out_fd = pipes[1][0]; pipes[1][0] = -1;
	e->err_fd = pipes[2][0]; pipes[2][0] = -1;
	/* Never block on one child: its pipes are non-blocking and only touched when poll says so. */
	fcntl(e->in_fd, F_SETFL, O_NONBLOCK);
	fcntl(e->out_fd, F_SETFL, O_NONBLOCK);
	fcntl(e->err_fd, F_SETFL, O_NONBLOCK);
	execs = grow(execs, nexecs);
	execs[nexecs++] = e;
out:
	for (int i = 0; i < 3; i++) { close_fd(&pipes[i][0]); close_fd(&pipes[i][1]); }
	free(cwd);
	for (uint32_t i = 0; argv && argv[i]; i++) free(argv[i]);
	for (uint32_t i = 0; envp && envp[i]; i++) free(envp[i]);
	free(argv);
	free(envp);
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
		/* What the child wrote before it died comes before its EXIT, unless the daemon paused us. */
		for (int i = 0; !e->paused && i < DRAIN_LIMIT && e->out_fd >= 0 && forward_output(e, &e->out_fd, EV_STDOUT); i++) {}
		for (int i = 0; !e->paused && i < DRAIN_LIMIT && e->err_fd >= 0 && forward_output(e, &e->err_fd, EV_STDERR); i++) {}
		e->exited = 1;
		send_u32(EV_EXIT, e->id, WIFEXITED(status) ? (uint32_t)WEXITSTATUS(status) : 128u + (uint32_t)WTERMSIG(status));
		check_finished(e);
	}
}

/* ---------- file operations ---------- */

/* Relative paths are under /workspace (also the agent's cwd, but explicit is safer). */
static char *resolve(const char *path)
{
	char *full;
	if (asprintf(&full, "%s%s%s", path[0] == '/' ? "" : WORKSPACE, path[0] == '/' ? "" : "/", path) < 0) kill_all_and_exit(3);
	return full;
}

static int remove_errno;
static char remove_path[4096];

static int remove_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st; (void)ftw;
	if (type == FTW_DNR || type == FTW_NS) { remove_errno = errno ? errno : EACCES; }
	else if (remove(path) == 0 || errno == ENOENT) return 0;
	else remove_errno = errno;
	snprintf(remove_path, sizeof remove_path, "%s", path);
	return 1;
}

/* rm -rf: never follows symlinks, a missing path is fine. */
static int remove_tree(const char *path)
{
	const char *base = strrchr(path, '/');
	base = base ? base + 1 : path;
	if (strspn(path, "/") == strlen(path) || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
		remove_errno = EINVAL;
		snprintf(remove_path, sizeof remove_path, "%s", path);
		return -1;
	}
	struct stat st;
	if (lstat(path, &st) < 0) {
		if (errno == ENOENT) return 0;
		remove_errno = errno;
		snprintf(remove_path, sizeof remove_path, "%s", path);
		return -1;
	}
	remove_errno = 0;
	if (nftw(path, remove_one, 16, FTW_PHYS | FTW_DEPTH) != 0) {
		if (!remove_errno) { remove_errno = errno; snprintf(remove_path, sizeof remove_path, "%s", path); }
		return -1;
	}
	return 0;
}

static int delete_entry(const char *entry)
{
	if (strcmp(entry, "./*") != 0) {
		char *full = resolve(entry);
		int r = remove_tree(full);
		free(full);
		return r;
	}
	/* Poseidon's glob over the workspace: like the shell's, it spares dotfiles. */
	DIR *dir = opendir(WORKSPACE);
	if (!dir) { remove_errno = errno; snprintf(remove_path, sizeof remove_path, "%s", WORKSPACE); return -1; }
	struct dirent *d;
	int r = 0;
	while (r == 0 && (d = readdir(dir))) {
		if (d->d_name[0] == '.') continue;
		char *full;
		if (asprintf(&full, "%s/%s", WORKSPACE, d->d_name) < 0) kill_all_and_exit(3);
		r = remove_tree(full);
		free(full);
	}
	closedir(dir);
	return r;
}

static int make_directory(char *path, int must_exist_as_dir)
{
	if (mkdir(path, 01777) == 0) {
		/* mkdir applies the umask; the owner is already root, the agent's uid. */
		return chmod(path, 01777);
	}
	if (errno != EEXIST) return -1;
	if (!must_exist_as_dir) return 0;
	struct stat st;
	if (stat(path, &st) < 0) return -1;
	if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; return -1; }
	if (chown(path, 0, 0) < 0) return -1;
	return chmod(path, 01777);
}

/* Creates every missing parent of path (mode 01777, owner root). */
static int make_parents(char *path)
{
	for (size_t i = 1; path[i]; i++) {
		if (path[i] != '/') continue;
		path[i] = 0;
		int r = make_directory(path, 0);
		path[i] = '/';
		if (r < 0) return -1;
	}
	return 0;
}

static int write_file(const char *path, const uint8_t *data, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0744);
	if (fd < 0) return -1;
	/* An existing file keeps owner and mode on O_TRUNC; make it what a fresh copy would be. */
	if (fchown(fd, 0, 0) < 0 || fchmod(fd, 0744) < 0) { int e = errno; close(fd); errno = e; return -1; }
	while (len > 0) {
		ssize_t w = write(fd, data, len);
		if (w < 0) {
			if (errno == EINTR) continue;
			int e = errno; close(fd); errno = e;
			return -1;
		}
		data += w; len -= (size_t)w;
	}
	return close(fd);
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
		if (r < 0) { send_result(id, (uint32_t)remove_errno, "cannot delete %s: %s", remove_path, strerror(remove_errno)); return; }
	}
	get_u32(c);
	for (uint32_t i = 0; i < ncopy; i++) {
		uint8_t is_directory = get_u8(c);
		char *path = get_str(c);
		size_t len;
		const uint8_t *content = get_bytes(c, &len);
		char *full = resolve(path);
		size_t n = strlen(full);
		while (n > 1 && full[n - 1] == '/') full[--n] = 0; /* "dir/" names the directory dir */
		int r = strcmp(full, "/") == 0 ? (errno = EISDIR, -1) : make_parents(full);
		if (r == 0) r = is_directory ? make_directory(full, 1) : write_file(full, content, len);
		int e = errno;
		if (r < 0) send_result(id, (uint32_t)e, "cannot write %s: %s", path, strerror(e));
		free(path);
		free(full);
		if (r < 0) return;
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
	FILE *f = fopen(file, "re");
	if (!f) return;
	char line[1024];
	while (fgets(line, sizeof line, f)) {
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

struct listing { uint32_t id; int recursive; struct buffer out; char *path; size_t path_len, path_cap; };

/* One entry as find -printf prints it, then (like find, without following links) its children. */
static int list_entry(struct listing *l, int parent, const char *name, int depth)
{
	struct stat st;
	if (fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) < 0) return -1;
	char field[64], mode[11], numeric[16], target[4096] = "";
	buffer_field(&l->out, S_ISDIR(st.st_mode) ? "d" : S_ISLNK(st.st_mode) ? "l" : S_ISFIFO(st.st_mode) ? "p" : S_ISSOCK(st.st_mode) ? "s" : S_ISCHR(st.st_mode) ? "c" : S_ISBLK(st.st_mode) ? "b" : "f");
	snprintf(field, sizeof field, "%lld", (long long)st.st_size);
	buffer_field(&l->out, field);
	snprintf(field, sizeof field, "%lld.%09ld", (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
	buffer_field(&l->out, field);
	mode_string(st.st_mode, mode);
	buffer_field(&l->out, mode);
	buffer_field(&l->out, name_of(&users, st.st_uid, numeric));
	buffer_field(&l->out, name_of(&groups, st.st_gid, numeric));
	buffer_add(&l->out, l->path, l->path_len + 1);
	if (S_ISLNK(st.st_mode)) {
		ssize_t n = readlinkat(parent, name, target, sizeof target - 1);
		target[n > 0 ? n : 0] = 0;
	}
	buffer_field(&l->out, target);
	if (l->out.len >= CHUNK) { send_event(EV_LISTING, l->id, l->out.data, l->out.len); l->out.len = 0; }

	if (!S_ISDIR(st.st_mode) || (depth > 0 && !l->recursive)) return 0;
	/* The start path may name a directory through a link ("link/"); below it, links are never followed. */
	int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC | (depth > 0 ? O_NOFOLLOW : 0));
	DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
	if (!dir) { if (fd >= 0) close(fd); return depth == 0 ? -1 : 0; } /* like find: report, go on */
	size_t base = l->path_len;
	struct dirent *d;
	while ((d = readdir(dir))) {
		if (strcmp(d->d_name, ".") == 0 || strcmp(d->d_name, "..") == 0) continue;
		size_t n = strlen(d->d_name);
		int slash = base > 0 && l->path[base - 1] != '/';
		if (base + slash + n + 1 > l->path_cap) {
			l->path_cap = (base + slash + n + 1) * 2;
			char *p = realloc(l->path, l->path_cap);
			if (!p) kill_all_and_exit(3);
			l->path = p;
		}
		if (slash) l->path[base] = '/';
		memcpy(l->path + base + slash, d->d_name, n + 1);
		l->path_len = base + slash + n;
		list_entry(l, dirfd(dir), d->d_name, depth + 1);
		l->path_len = base;
		l->path[base] = 0;
	}
	closedir(dir);
	return 0;
}

static void handle_list(uint32_t id, struct cursor *c)
{
	uint8_t flags = get_u8(c);
	uint32_t uid = get_u32(c), gid = get_u32(c);
	char *path = get_str(c);
	if (c->bad || c->n != 0) { send_result(id, EINVAL, "malformed LIST request"); free(path); return; }
	load_names(&users, "/etc/passwd");
	load_names(&groups, "/etc/group");
	struct listing l = { .id = id, .recursive = (flags & FLAG_RECURSIVE) != 0, .path = path, .path_len = strlen(path) };
	l.path_cap = l.path_len + 1;
	char *full = resolve(path);
	enter_identity(flags, uid, gid);
	int r = list_entry(&l, AT_FDCWD, full, 0);
	int e = errno;
	leave_identity();
	if (l.out.len > 0) send_event(EV_LISTING, id, l.out.data, l.out.len);
	if (r < 0) send_result(id, (uint32_t)e, "cannot list %s: %s", path, strerror(e));
	else send_result(id, 0, NULL);
	free(l.out.data);
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
	/* O_NONBLOCK: opening a FIFO must not hang the agent; it is rejected right after. */
	int fd = open(full, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	int e = errno;
	leave_identity();
	struct stat st;
	if (fd >= 0 && fstat(fd, &st) < 0) { e = errno; close_fd(&fd); }
	if (fd >= 0 && !S_ISREG(st.st_mode)) { e = EINVAL; close_fd(&fd); send_result(id, (uint32_t)e, "cannot read %s: not a regular file", path); }
	else if (fd < 0) send_result(id, (uint32_t)e, "cannot read %s: %s", path, strerror(e));
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
	if (n < 0) { send_result(r->id, (uint32_t)errno, "cannot read: %s", strerror(errno)); r->done = 1; return; }
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
		if ((e = find_exec(id))) e->paused = type == REQ_PAUSE;
		if ((r = find_reader(id))) r->paused = type == REQ_PAUSE;
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
