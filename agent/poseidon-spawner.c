/*
 * poseidon-spawner: starts sandboxes for the daemon, so the daemon never forks itself.
 *
 * Forking the daemon (a large Node process) costs milliseconds of its main thread per sandbox;
 * this small process forks instead. The daemon starts it once, with the path of a unix socket the
 * daemon listens on as its only argument, and talks to it over its stdin (requests) and stdout
 * (events), in the agent's frame format: u32 LE length-of-rest | u8 type | u32 LE id | payload.
 *
 * REQUESTS (daemon -> spawner)
 *   0x01 SPAWN  16-byte key | u32 flags | u32 id base | u32 id count | procs | argv | env("K=V") | idmapped
 *               | u32 ndata | ndata*(u32 fd | u32 len | bytes)   (lists: u32 n | n*str, str = u32 len + bytes)
 *               The child connects a fresh socket to the daemon's path, writes the key (so the
 *               daemon can tell which spawn the connection belongs to), and execs argv with that
 *               socket as fd 0 and 1 and a pipe to the spawner as fd 2.
 *   0x02 KILL   (empty) SIGKILL to the child.
 *   0x03 DETACH (empty) The child (a bubblewrap that now only waits for its one child, the sandbox's
 *               pid 1) is replaced by that child: the spawner, a subreaper, kills the waiting
 *               process and adopts the orphan, so a live sandbox costs one host process, not two.
 *               From then on KILL and EXITED concern the adopted process.
 * EVENTS (spawner -> daemon)
 *   0x81 STARTED  i32 pid
 *   0x82 FAILED   message (no child was started)
 *   0x83 EXITED   i32 wait status | the first STDERR_KEEP bytes the child wrote to fd 2
 *   0x84 DETACHED i32 pid of the process now held: the adopted one, or the same as before if the
 *                 child had not exactly one child of its own (then nothing changed)
 *
 * When stdin reaches EOF (the daemon is gone) the spawner kills all its children and exits; its
 * direct children also die with it (PR_SET_PDEATHSIG). A DETACHed sandbox's pid 1 has no death
 * signal: it ends when its connection to the daemon does, which a dying daemon closes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "frame-reader.h"

enum { REQ_SPAWN = 0x01, REQ_KILL = 0x02, REQ_DETACH = 0x03, EV_STARTED = 0x81, EV_FAILED = 0x82, EV_EXITED = 0x83, EV_DETACHED = 0x84 };
enum { FLAG_USERNS = 1, FLAG_NETNS = 2, FLAG_AGENT = 4 };
/* Where a spawned process finds the agent with FLAG_AGENT: bwrap runs /proc/self/fd/3. */
#define AGENT_FD 3
/* Data fds are moved out of the way before being put in place, so no target is clobbered. */
#define FD_SCRATCH 100
#define MAX_DATA_FDS 16
/* Below the daemon's 0 and learner code's 0: the OOM killer ends the agent last. */
#define SANDBOX_OOM_SCORE_ADJ "-999"

#define KEY_LEN 16
#define STDERR_KEEP 4096
#define MAX_FRAME (64u << 20)

struct child {
	uint32_t id;
	pid_t pid;
	int err_fd;
	size_t err_len;
	char err[STDERR_KEEP];
};

static struct child **children;
static size_t nchildren;
static struct sockaddr_un daemon_addr;
static int agent_memfd = -1;

/* Directories shown idmapped (at most this many per spawn), each at IDMAPPED_DIR/<index>. */
#define MAX_IDMAPPED 4
/*
 * Where the idmapped clones are mounted in the child's private mount namespace: on a tmpfs of its
 * own over /tmp, so that every directory on the way is searchable by the sandbox's root (an image
 * root under a 0700 state directory could not be reached through the host's path). bubblewrap
 * mounts its own tmpfs over /tmp and pivots away from it; below it, this one stays at /tmp.
 */
#define IDMAPPED_DIR "/tmp/.poseidon-idmapped"

struct spawn_request {
	uint32_t flags, id_base, id_count;
	char **procs, **argv, **envp, **idmapped;
	/* open_tree clones of the idmapped directories, made while the child is host root. */
	int tree_fd[MAX_IDMAPPED];
	uint32_t ndata;
	uint32_t data_fd[MAX_DATA_FDS];
	const uint8_t *data[MAX_DATA_FDS];
	uint32_t data_len[MAX_DATA_FDS];
};

static void write_all(const void *data, size_t len)
{
	const uint8_t *p = data;
	while (len > 0) {
		ssize_t w = write(1, p, len);
		if (w < 0) {
			if (errno == EINTR) continue;
			/* the daemon is gone; our children die with us */
			dprintf(2, "poseidon-spawner: exiting: cannot write to the daemon: %s\n", strerror(errno));
			_exit(1);
		}
		p += w; len -= (size_t)w;
	}
}

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}


static void send_event(uint8_t type, uint32_t id, const void *a, size_t alen, const void *b, size_t blen)
{
	uint8_t head[9];
	put_u32(head, (uint32_t)(5 + alen + blen));
	head[4] = type;
	put_u32(head + 5, id);
	write_all(head, sizeof head);
	if (alen) write_all(a, alen);
	if (blen) write_all(b, blen);
}

static void send_failed(uint32_t id, const char *what)
{
	char msg[256];
	int n = snprintf(msg, sizeof msg, "poseidon-spawner: %s: %s", what, strerror(errno));
	send_event(EV_FAILED, id, msg, n < 0 ? 0 : (size_t)n, NULL, 0);
}

/* Every exit says why on stderr (the daemon's): a spawner that just vanishes cannot be diagnosed. */
static void kill_all_and_exit(int code, const char *why)
{
	for (size_t i = 0; i < nchildren; i++) kill(children[i]->pid, SIGKILL);
	dprintf(2, "poseidon-spawner: exiting (%d) after killing %zu sandbox process(es): %s\n", code, nchildren, why);
	_exit(code);
}

#define SANDBOX_NICE 10

static void child_fail(const char *what)
{
	dprintf(2, "poseidon-spawner: %s: %s\n", what, strerror(errno));
	_exit(126);
}

static void write_file_or_fail(const char *path, const char *data, const char *what)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0) child_fail(what);
	ssize_t n = write(fd, data, strlen(data));
	if (n != (ssize_t)strlen(data)) child_fail(what);
	close(fd);
}

/*
 * Lowering the score needs CAP_SYS_RESOURCE, which some hosts withhold even from root (containers);
 * there the agent keeps the daemon's score. Either way the agent raises every learner process to a
 * score above its own, which needs no privilege, so the OOM killer picks learner code first.
 */
static void protect_from_oom_killer(void)
{
	int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
	if (fd < 0) return;
	if (write(fd, SANDBOX_OOM_SCORE_ADJ, strlen(SANDBOX_OOM_SCORE_ADJ)) < 0 && errno != EACCES && errno != EPERM) child_fail("oom_score_adj");
	close(fd);
}

/* A pipe holding data at fd target: bubblewrap reads such fds to EOF (--ro-bind-data, --seccomp). */
static void place_data(uint32_t target, const uint8_t *data, uint32_t len)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) child_fail("pipe");
	/* A pipe holds 64 KiB by default; the blobs (a seccomp program, small files) must fit at once. */
	if (len > 65536 && fcntl(p[1], F_SETPIPE_SZ, (int)len) < 0) child_fail("grow the data pipe");
	for (uint32_t off = 0; off < len;) {
		ssize_t w = write(p[1], data + off, len - off);
		if (w < 0) {
			if (errno == EINTR) continue;
			child_fail("write a data pipe");
		}
		off += (uint32_t)w;
	}
	close(p[1]);
	int moved = fcntl(p[0], F_DUPFD_CLOEXEC, FD_SCRATCH + (int)target);
	if (moved < 0) child_fail("move a data pipe");
	close(p[0]);
	if (dup2(moved, (int)target) < 0) child_fail("dup2 a data pipe");
	close(moved);
}

static void loopback_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) child_fail("socket for loopback");
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) child_fail("read loopback flags");
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) child_fail("bring loopback up");
	close(s);
}

/*
 * Enters a new user namespace as its root. Mapping a range of other host ids needs CAP_SETUID in
 * the parent namespace, which this process gives up by entering; a forked helper that stays
 * outside writes the maps.
 */
/*
 * In the id mapper, once the maps are written: each clone of an idmapped directory gets the new
 * user namespace as its idmap and is mounted at IDMAPPED_DIR/<index>, in the child's private mount
 * namespace (the mapper shares it). A file owned by uid k on disk then belongs to uid k inside the
 * sandbox (host id base+k), whichever id range the runner got, without copying or chowning.
 */
static void idmap_trees(pid_t target, char **dirs, const int *tree_fd)
{
	if (!dirs || !dirs[0]) return;
	char path[64];
	snprintf(path, sizeof path, "/proc/%d/ns/user", (int)target);
	int userns = open(path, O_RDONLY | O_CLOEXEC);
	if (userns < 0) child_fail("open the user namespace");
	for (size_t i = 0; dirs[i]; i++) {
		struct mount_attr attr = {
			.attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
			.userns_fd = (uint64_t)userns,
		};
		if (mount_setattr(tree_fd[i], "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) child_fail("idmap the image root (does its file system support idmapped mounts?)");
		snprintf(path, sizeof path, IDMAPPED_DIR "/%zu", i);
		if (move_mount(tree_fd[i], "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH) < 0) child_fail("mount the idmapped image root");
	}
	close(userns);
}

/*
 * Before the user namespace exists, as host root: a private mount namespace (nothing mounted in
 * it reaches the host's) and a detached clone of each directory to be idmapped.
 */
static void clone_trees(char **dirs, int *tree_fd)
{
	if (!dirs || !dirs[0]) return;
	if (unshare(CLONE_NEWNS) < 0) child_fail("unshare the mount namespace");
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) child_fail("make the mount namespace private");
	for (size_t i = 0; dirs[i]; i++) {
		tree_fd[i] = open_tree(AT_FDCWD, dirs[i], OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
		if (tree_fd[i] < 0) child_fail(dirs[i]);
	}
	if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k") < 0) child_fail("mount a tmpfs for the idmapped roots");
	if (mkdir(IDMAPPED_DIR, 0755) < 0) child_fail("mkdir " IDMAPPED_DIR);
	char path[64];
	for (size_t i = 0; dirs[i]; i++) {
		snprintf(path, sizeof path, IDMAPPED_DIR "/%zu", i);
		if (mkdir(path, 0755) < 0) child_fail("mkdir an idmapped root's mount point");
	}
}

static void enter_user_namespace(uint32_t base, uint32_t count, char **idmapped, const int *tree_fd)
{
	int go[2];
	if (pipe2(go, O_CLOEXEC) < 0) child_fail("pipe");
	pid_t self = getpid();
	pid_t mapper = fork();
	if (mapper < 0) child_fail("fork the id mapper");
	if (mapper == 0) {
		char c, path[64], map[64];
		close(go[1]);
		if (read(go[0], &c, 1) != 1) _exit(1);
		snprintf(map, sizeof map, "0 %u %u\n", base, count);
		snprintf(path, sizeof path, "/proc/%d/uid_map", (int)self);
		write_file_or_fail(path, map, "write uid_map");
		snprintf(path, sizeof path, "/proc/%d/gid_map", (int)self);
		write_file_or_fail(path, map, "write gid_map");
		idmap_trees(self, idmapped, tree_fd);
		_exit(0);
	}
	close(go[0]);
	if (unshare(CLONE_NEWUSER) < 0) child_fail("unshare the user namespace");
	if (write(go[1], "x", 1) != 1) child_fail("signal the id mapper");
	close(go[1]);
	int status;
	while (waitpid(mapper, &status, 0) < 0)
		if (errno != EINTR) child_fail("wait for the id mapper");
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { errno = EPERM; child_fail("map the user namespace's ids"); }
	/* Our ids are still the host's root, unmapped here; become the namespace's root. */
	if (setresgid(0, 0, 0) < 0) child_fail("setresgid");
	if (setgroups(0, NULL) < 0) child_fail("setgroups");
	if (setresuid(0, 0, 0) < 0) child_fail("setresuid");
	/* Nothing in the sandbox may make a user namespace of its own (seccomp forbids it as well). */
	write_file_or_fail("/proc/sys/user/max_user_namespaces", "0", "forbid nested user namespaces");
}

/* In the forked child: build the process's namespaces and fds, then exec. Never returns. */
static void child_main(pid_t parent, const uint8_t *key, int err_w, struct spawn_request *rq)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
	signal(SIGQUIT, SIG_DFL);
	if (dup2(err_w, 2) < 0) _exit(126);
	/*
	 * A session of its own: a signal to the daemon's process group or terminal (Ctrl-C, systemd)
	 * must not reach sandboxes directly; the daemon drains and removes them itself.
	 */
	if (setsid() < 0) child_fail("setsid");
	/* Nobody may outlive the spawner: this survives exec (bwrap then sets its own). */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) child_fail("prctl");
	if (getppid() != parent) { dprintf(2, "poseidon-spawner: the spawner ended while this child was starting\n"); _exit(126); }
	/* Into the runner's cgroups before anything can fork, or a fork bomb could escape the pids limit. */
	char pid_text[16];
	snprintf(pid_text, sizeof pid_text, "%d", (int)getpid());
	for (char **procs = rq->procs; *procs; procs++) write_file_or_fail(*procs, pid_text, *procs);
	/*
	 * Sandboxes, and all learner code in them, run below the daemon's CPU priority: building
	 * pools and running programs must not slow down the API that hands runners out.
	 */
	if (setpriority(PRIO_PROCESS, 0, SANDBOX_NICE) < 0) child_fail("setpriority");
	if (rq->flags & FLAG_AGENT) protect_from_oom_killer();
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0) child_fail("socket");
	if (connect(s, (struct sockaddr *)&daemon_addr, sizeof daemon_addr) < 0) child_fail("connect to the daemon");
	for (size_t off = 0; off < KEY_LEN;) {
		ssize_t w = write(s, key + off, KEY_LEN - off);
		if (w < 0) {
			if (errno == EINTR) continue;
			child_fail("write to the daemon");
		}
		off += (size_t)w;
	}
	if (dup2(s, 0) < 0 || dup2(s, 1) < 0) child_fail("dup2");
	if (s > 2) close(s);
	if (rq->flags & FLAG_AGENT) {
		if (agent_memfd < 0) { errno = ENOENT; child_fail("the spawner was started without an agent"); }
		if (dup2(agent_memfd, AGENT_FD) < 0) child_fail("dup2 the agent");
	}
	for (uint32_t i = 0; i < rq->ndata; i++) place_data(rq->data_fd[i], rq->data[i], rq->data_len[i]);
	if (rq->flags & FLAG_NETNS) {
		if (unshare(CLONE_NEWNET) < 0) child_fail("unshare the network namespace");
		loopback_up();
	}
	if (rq->flags & FLAG_USERNS) {
		clone_trees(rq->idmapped, rq->tree_fd);
		enter_user_namespace(rq->id_base, rq->id_count, rq->idmapped, rq->tree_fd);
	}
	execve(rq->argv[0], rq->argv, rq->envp);
	child_fail(rq->argv[0]);
}

/* Reads a u32-counted list of u32-length strings into a NULL-terminated array (NULL on bad input). */
static char **get_strings(const uint8_t **p, const uint8_t *end)
{
	if (end - *p < 4) return NULL;
	uint32_t n = frame_u32(*p);
	*p += 4;
	if (n > (uint32_t)(end - *p) / 4) return NULL;
	char **list = calloc((size_t)n + 1, sizeof *list);
	if (!list) return NULL;
	for (uint32_t i = 0; i < n; i++) {
		if (end - *p < 4) goto bad;
		uint32_t len = frame_u32(*p);
		*p += 4;
		if (len > (uint32_t)(end - *p)) goto bad;
		list[i] = strndup((const char *)*p, len);
		if (!list[i]) goto bad;
		*p += len;
	}
	return list;
bad:
	for (uint32_t i = 0; i < n; i++) free(list[i]);
	free(list);
	return NULL;
}

static void free_strings(char **list)
{
	if (!list) return;
	for (char **s = list; *s; s++) free(*s);
	free(list);
}

static int parse_spawn(struct spawn_request *rq, const uint8_t *p, const uint8_t *end)
{
	if (end - p < 12) return -1;
	rq->flags = frame_u32(p);
	rq->id_base = frame_u32(p + 4);
	rq->id_count = frame_u32(p + 8);
	p += 12;
	if (!(rq->procs = get_strings(&p, end))) return -1;
	if (!(rq->argv = get_strings(&p, end)) || !rq->argv[0]) return -1;
	if (!(rq->envp = get_strings(&p, end))) return -1;
	if (!(rq->idmapped = get_strings(&p, end))) return -1;
	size_t nidmapped = 0;
	while (rq->idmapped[nidmapped]) {
		/* Absolute paths only: the child resolves them, the mapper mounts over them. */
		if (rq->idmapped[nidmapped][0] != '/') return -1;
		nidmapped++;
	}
	/* An idmap needs the user namespace it maps to. */
	if (nidmapped > MAX_IDMAPPED || (nidmapped > 0 && !(rq->flags & FLAG_USERNS))) return -1;
	if (end - p < 4) return -1;
	rq->ndata = frame_u32(p);
	p += 4;
	if (rq->ndata > MAX_DATA_FDS) return -1;
	for (uint32_t i = 0; i < rq->ndata; i++) {
		if (end - p < 8) return -1;
		rq->data_fd[i] = frame_u32(p);
		rq->data_len[i] = frame_u32(p + 4);
		p += 8;
		/* fds 0-3 are the connection, stderr and the agent */
		if (rq->data_fd[i] <= AGENT_FD || rq->data_fd[i] >= FD_SCRATCH || rq->data_len[i] > (uint32_t)(end - p)) return -1;
		rq->data[i] = p;
		p += rq->data_len[i];
	}
	if (p != end) return -1;
	if ((rq->flags & FLAG_USERNS) && (rq->id_count == 0 || rq->id_base == 0 || rq->id_base > UINT32_MAX - rq->id_count)) return -1;
	return 0;
}

static void handle_spawn(uint32_t id, const uint8_t *p, const uint8_t *end)
{
	struct spawn_request rq = { 0 };
	int err[2] = { -1, -1 };
	if (end - p < KEY_LEN) { errno = EINVAL; send_failed(id, "bad SPAWN request"); return; }
	const uint8_t *key = p;
	p += KEY_LEN;
	if (parse_spawn(&rq, p, end) < 0) { errno = EINVAL; send_failed(id, "bad SPAWN request"); goto out; }
	struct child *c = calloc(1, sizeof *c);
	struct child **grown = realloc(children, (nchildren + 1) * sizeof *children);
	if (!c || !grown) { free(c); if (grown) children = grown; errno = ENOMEM; send_failed(id, "spawn"); goto out; }
	children = grown;
	if (pipe2(err, O_CLOEXEC) < 0) { free(c); send_failed(id, "pipe"); goto out; }
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid < 0) { free(c); send_failed(id, "fork"); goto out; }
	if (pid == 0) child_main(parent, key, err[1], &rq);
	close(err[1]); err[1] = -1;
	fcntl(err[0], F_SETFL, O_NONBLOCK);
	c->id = id;
	c->pid = pid;
	c->err_fd = err[0]; err[0] = -1;
	children[nchildren++] = c;
	int32_t spid = pid;
	uint8_t b[4];
	put_u32(b, (uint32_t)spid);
	send_event(EV_STARTED, id, b, 4, NULL, 0);
out:
	if (err[0] >= 0) close(err[0]);
	if (err[1] >= 0) close(err[1]);
	free_strings(rq.procs);
	free_strings(rq.argv);
	free_strings(rq.envp);
	free_strings(rq.idmapped);
}

/* Keeps the first STDERR_KEEP bytes and drops the rest; EOF closes the pipe. */
static void drain_stderr(struct child *c)
{
	char buf[4096];
	while (c->err_fd >= 0) {
		ssize_t n = read(c->err_fd, buf, sizeof buf);
		if (n < 0 && errno == EINTR) continue;
		if (n < 0 && errno == EAGAIN) return;
		if (n <= 0) { close(c->err_fd); c->err_fd = -1; return; }
		size_t room = STDERR_KEEP - c->err_len, take = (size_t)n < room ? (size_t)n : room;
		memcpy(c->err + c->err_len, buf, take);
		c->err_len += take;
	}
}

static void reap_children(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (size_t i = 0; i < nchildren; i++) {
			struct child *c = children[i];
			if (c->pid != pid) continue;
			drain_stderr(c);
			if (c->err_fd >= 0) close(c->err_fd);
			uint8_t b[4];
			put_u32(b, (uint32_t)status);
			send_event(EV_EXITED, c->id, b, 4, c->err, c->err_len);
			children[i] = children[--nchildren];
			free(c);
			break;
		}
	}
}

/* The only child of pid, or 0 if it has none or several (or the kernel lacks the children file). */
static pid_t only_child(pid_t pid)
{
	char path[64], text[64];
	snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pid, (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) return 0;
	ssize_t n = read(fd, text, sizeof text - 1);
	close(fd);
	if (n <= 0) return 0;
	text[n] = '\0';
	char *end;
	long first = strtol(text, &end, 10);
	while (*end == ' ' || *end == '\n') end++;
	return first > 0 && *end == '\0' ? (pid_t)first : 0;
}

/*
 * Replaces the child by its only child (see DETACH). Killing the waiting parent orphans the
 * grandchild, which the kernel hands to the nearest subreaper: this process. The old pid is
 * reaped by reap_children without an event, as no child holds it any more.
 */
static void detach(struct child *c)
{
	pid_t inner = only_child(c->pid);
	if (inner > 0 && kill(c->pid, SIGKILL) == 0) c->pid = inner;
	uint8_t b[4];
	put_u32(b, (uint32_t)c->pid);
	send_event(EV_DETACHED, c->id, b, 4, NULL, 0);
}

static void handle_frame(uint8_t type, uint32_t id, const uint8_t *payload, size_t len)
{
	if (type == REQ_SPAWN) {
		handle_spawn(id, payload, payload + len);
	} else if (type == REQ_KILL) {
		for (size_t i = 0; i < nchildren; i++)
			if (children[i]->id == id) kill(children[i]->pid, SIGKILL);
	} else if (type == REQ_DETACH) {
		for (size_t i = 0; i < nchildren; i++)
			if (children[i]->id == id) { detach(children[i]); break; }
	} else {
		fprintf(stderr, "poseidon-spawner: unknown request type %u\n", type);
		kill_all_and_exit(2, "unknown request");
	}
}

static struct frame_reader requests = { .chunk = 65536, .max_frame = MAX_FRAME };

static void read_requests(void)
{
	int rc = frame_reader_read(&requests, 0, handle_frame);
	/* EOF: the daemon closed its end (it stops) or is gone; so are its sandboxes. Quiet: the normal end. */
	if (rc == FRAMES_EOF) {
		for (size_t i = 0; i < nchildren; i++) kill(children[i]->pid, SIGKILL);
		_exit(0);
	}
	if (rc == FRAMES_BAD) {
		fprintf(stderr, "poseidon-spawner: bad frame length %u\n", requests.bad_length);
		kill_all_and_exit(2, "bad request frame");
	}
	if (rc == FRAMES_NO_MEMORY) kill_all_and_exit(3, "out of memory reading a request");
}

/*
 * The agent, copied once into a sealed memfd: sandboxes exec it from there, so no host path of it
 * is mounted into a sandbox (and shows in its mountinfo), and no image needs a mount point for it.
 */
static int load_agent(const char *path)
{
	int in = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (in < 0 || fstat(in, &st) < 0) { fprintf(stderr, "poseidon-spawner: %s: %s\n", path, strerror(errno)); return -1; }
	int fd = memfd_create("poseidon-agent", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0) { perror("poseidon-spawner: memfd_create"); return -1; }
	char buf[65536];
	ssize_t n;
	while ((n = read(in, buf, sizeof buf)) > 0)
		if (write(fd, buf, (size_t)n) != n) { perror("poseidon-spawner: copy the agent"); return -1; }
	if (n < 0) { perror("poseidon-spawner: read the agent"); return -1; }
	close(in);
	fchmod(fd, 0555);
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) { perror("poseidon-spawner: seal the agent"); return -1; }
	return fd;
}

int main(int argc, char **argv)
{
	if ((argc != 2 && argc != 3) || strlen(argv[1]) >= sizeof daemon_addr.sun_path) {
		fprintf(stderr, "usage: poseidon-spawner SOCKET-PATH (shorter than %zu bytes) [AGENT-PATH]\n", sizeof daemon_addr.sun_path);
		return 2;
	}
	daemon_addr.sun_family = AF_UNIX;
	strcpy(daemon_addr.sun_path, argv[1]);
	if (argc == 3 && (agent_memfd = load_agent(argv[2])) < 0) return 1;
	/* Without the daemon there is nobody to serve: die with it even if its pipe lingers. */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) { perror("poseidon-spawner: prctl(PR_SET_PDEATHSIG)"); return 1; }
	/* Orphans of our children come to us, so a DETACHed sandbox's pid 1 stays ours to wait for and kill. */
	if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) { perror("poseidon-spawner: prctl(PR_SET_CHILD_SUBREAPER)"); return 1; }
	/*
	 * No check of getppid() here: the daemon may itself be pid 1 (node as a container's init), and a
	 * daemon that died before the prctl above is noticed anyway, as EOF on stdin at the first read.
	 *
	 * A signal to the daemon's whole process group (systemd's KillMode=control-group or mixed, a
	 * Ctrl-C) must not end the spawner before the daemon drained: it ignores them and ends with
	 * the daemon, at EOF. Its children get the default dispositions back (child_main).
	 */
	signal(SIGTERM, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	signal(SIGQUIT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sigfd < 0) { perror("poseidon-spawner: signalfd"); return 1; }
	fcntl(0, F_SETFL, fcntl(0, F_GETFL) & ~O_NONBLOCK);
	fcntl(1, F_SETFL, fcntl(1, F_GETFL) & ~O_NONBLOCK);

	struct pollfd *fds = NULL;
	for (;;) {
		size_t n = 2;
		fds = realloc(fds, (2 + nchildren) * sizeof *fds);
		if (!fds) kill_all_and_exit(3, "out of memory");
		fds[0] = (struct pollfd){ 0, POLLIN, 0 };
		fds[1] = (struct pollfd){ sigfd, POLLIN, 0 };
		for (size_t i = 0; i < nchildren; i++)
			if (children[i]->err_fd >= 0) fds[n++] = (struct pollfd){ children[i]->err_fd, POLLIN, 0 };
		if (poll(fds, n, -1) < 0) {
			if (errno == EINTR) continue;
			perror("poseidon-spawner: poll");
			kill_all_and_exit(1, "poll failed");
		}
		for (size_t i = 2; i < n; i++) {
			if (!fds[i].revents) continue;
			for (size_t j = 0; j < nchildren; j++)
				if (children[j]->err_fd == fds[i].fd) { drain_stderr(children[j]); break; }
		}
		if (fds[1].revents) {
			struct signalfd_siginfo info;
			while (read(sigfd, &info, sizeof info) == sizeof info) {}
			reap_children();
		}
		if (fds[0].revents) read_requests();
	}
}
