/*
 * The seccomp policy of every sandbox, in one place. A host tool: it builds the filter with
 * libseccomp and writes the raw BPF program (an array of struct sock_filter) that bubblewrap loads
 * with --seccomp FD. bwrap applies it to the sandbox's first process (the agent); every process of
 * the runner descends from it and inherits it, and no process can remove it.
 *
 *   poseidon-seccomp-bpf [FILE]     the BPF program, to FILE or stdout
 *   poseidon-seccomp-bpf --pfc      the same filter as readable pseudo code (for review)
 *
 * In the spirit of Docker's default profile, but as a deny list: everything not named here is
 * allowed, a denied call fails with EPERM (ENOSYS where that makes libc fall back to a call we can
 * check). Docker grants several of these calls to containers given extra capabilities; no runner
 * gets those capabilities, so here they are denied outright.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif

static scmp_filter_ctx ctx;

static void fail(const char *what, int rc)
{
	fprintf(stderr, "poseidon-seccomp-bpf: %s: %s\n", what, strerror(-rc));
	exit(1);
}

/* Every syscall in names[] fails with errno, whatever its arguments. */
static void deny(int err, const char *const names[])
{
	for (; *names; names++) {
		int nr = seccomp_syscall_resolve_name(*names);
		if (nr == __NR_SCMP_ERROR) fail(*names, -EINVAL);
		int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), nr, 0);
		if (rc < 0) fail(*names, rc);
	}
}

/* The call fails with errno when (argument `arg` & mask) == value. */
static void deny_masked(int err, int nr, const char *name, unsigned arg, scmp_datum_t mask, scmp_datum_t value)
{
	int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), nr, 1, SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, mask, value));
	if (rc < 0) fail(name, rc);
}

static void build_policy(void)
{
	/*
	 * New namespaces. A user namespace gives its creator every capability inside it, which opens
	 * kernel code (nf_tables, mounts of many file systems, ...) meant for real root only: the
	 * usual first step of a container escape (`unshare -Urm`, `unshare -Urn` then nft). No
	 * namespace of any kind is created or joined from inside a runner.
	 */
	deny(EPERM, (const char *const[]){ "unshare", "setns", NULL });
	/* clone is still how fork and threads are made: only its namespace flags are refused. Its
	 * CLONE_NEWTIME bit (0x80) lies in the exit-signal byte and means nothing to clone. */
	const scmp_datum_t clone_new[] = { CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC,
		CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET };
	for (size_t i = 0; i < sizeof clone_new / sizeof clone_new[0]; i++)
		deny_masked(EPERM, SCMP_SYS(clone), "clone", 0, clone_new[i], clone_new[i]);
	/* clone3 takes its flags in memory, which seccomp cannot read. ENOSYS makes glibc fall back to
	 * clone, whose flags are checked above. */
	deny(ENOSYS, (const char *const[]){ "clone3", NULL });

	/* Mounts, old and new API, and changing the root: the file system layout bwrap built stays as
	 * it is (with a private mount namespace these would need CAP_SYS_ADMIN anyway). */
	deny(EPERM, (const char *const[]){ "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig",
		"fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", NULL });

	/* The kernel keyring is not namespaced: keys are shared by every process of a host uid, so a
	 * runner could read or plant another runner's keys, and exhaust the uid's key quota. */
	deny(EPERM, (const char *const[]){ "keyctl", "add_key", "request_key", NULL });

	/* Large kernel attack surfaces with a history of privilege escalations, and of information
	 * leaks about the host (performance counters, eBPF, page-fault handling by user space). */
	deny(EPERM, (const char *const[]){ "bpf", "perf_event_open", "userfaultfd", NULL });
	/* io_uring: runs operations from kernel workers, out of reach of this filter, and has been
	 * the source of many kernel exploits (Docker and Google disable it too). */
	deny(EPERM, (const char *const[]){ "io_uring_setup", "io_uring_enter", "io_uring_register", NULL });

	/* The kernel itself: loading a new kernel or modules, swap, reboot. */
	deny(EPERM, (const char *const[]){ "kexec_load", "kexec_file_load", "init_module", "finit_module",
		"delete_module", "swapon", "swapoff", "reboot", NULL });

	/* The host's clock (not namespaced; adjtimex and clock_adjtime can also change it). */
	deny(EPERM, (const char *const[]){ "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", NULL });

	/* Host-wide administration: process accounting, disk quotas, the kernel log, the terminal. */
	deny(EPERM, (const char *const[]){ "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", NULL });

	/* File handles name any inode of a file system, escaping the sandbox's mounts (the "shocker"
	 * escape needs only CAP_DAC_READ_SEARCH, which privileged executions keep). fanotify watches
	 * whole file systems. */
	deny(EPERM, (const char *const[]){ "open_by_handle_at", "name_to_handle_at", "fanotify_init", NULL });

	/* Raw I/O port access. */
	deny(EPERM, (const char *const[]){ "iopl", "ioperm", NULL });

	/* Obsolete calls, removed from or never implemented by current kernels: nothing needs them
	 * and an old kernel's implementation is the only thing they could reach. */
	deny(EPERM, (const char *const[]){ "nfsservctl", "uselib", "ustat", "sysfs", "_sysctl",
		"lookup_dcookie", "create_module", "get_kernel_syms", "query_module", "afs_syscall",
		"tuxcall", "security", "getpmsg", "putpmsg", "vserver", NULL });

	/* Taking a file descriptor out of another process. Everything it could reach is in the runner's
	 * own pid namespace, but nothing a learner runs needs it, and the sandbox's init process holds
	 * the agent's channel to the daemon. */
	deny(EPERM, (const char *const[]){ "pidfd_getfd", NULL });

	/*
	 * ptrace stays allowed, as in Docker on kernels >= 4.8 (gdb and strace are teaching tools):
	 * every process a runner can see is in its own pid namespace, so it can trace only its own
	 * processes; since 4.8 the kernel re-checks seccomp after a tracer changes a syscall, so
	 * tracing cannot bypass this filter; the agent is non-dumpable and has capabilities no
	 * execution keeps, so no execution, privileged or not, can attach to it. That last point must
	 * hold for every process that holds the agent's channel to the daemon. process_vm_readv/writev
	 * and kcmp make the same checks as ptrace and are allowed for the same reasons.
	 */

	/*
	 * personality: only the values Docker allows (PER_LINUX 0x0, PER_LINUX32 0x8, UNAME26 0x20000,
	 * UNAME26|PER_LINUX32 0x20008, and 0xffffffff, which only queries). Others, such as
	 * READ_IMPLIES_EXEC or ADDR_NO_RANDOMIZE, weaken protections of the programs run afterwards.
	 * A rule may compare an argument only once, so "not one of these" is built from single
	 * comparisons: a value above 32 bits; or, with bit 0 clear, any bit other than 3 and 17 set;
	 * or, with bit 0 set, any other bit clear (only 0xffffffff has them all).
	 */
	int personality = SCMP_SYS(personality);
	int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), personality, 1, SCMP_A0(SCMP_CMP_GT, 0xffffffffULL));
	if (rc < 0) fail("personality", rc);
	for (unsigned bit = 1; bit < 32; bit++) {
		scmp_datum_t b = 1ULL << bit;
		if (bit != 3 && bit != 17) deny_masked(EPERM, personality, "personality", 0, b | 1, b);
		deny_masked(EPERM, personality, "personality", 0, b | 1, 1);
	}
}

int main(int argc, char **argv)
{
	int pfc = argc == 2 && strcmp(argv[1], "--pfc") == 0;
	if (argc > 2 || (argc == 2 && argv[1][0] == '-' && !pfc)) {
		fprintf(stderr, "usage: poseidon-seccomp-bpf [--pfc | FILE]\n");
		return 2;
	}
	/* Allowed unless named above; calls of another ABI than the native one (i386 through int 0x80,
	 * x32 numbers with bit 0x40000000) are not checked by this filter, so they kill the process. */
	ctx = seccomp_init(SCMP_ACT_ALLOW);
	if (!ctx) fail("seccomp_init", -ENOMEM);
	int rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
	if (rc < 0) fail("bad-architecture action", rc);
	/* A binary search over syscall numbers instead of a linear list: fewer instructions per call. */
	rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
	if (rc < 0) fail("optimize", rc);
	build_policy();

	int fd = STDOUT_FILENO;
	if (argc == 2 && !pfc) {
		fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0) fail(argv[1], -errno);
	}
	rc = pfc ? seccomp_export_pfc(ctx, fd) : seccomp_export_bpf(ctx, fd);
	if (rc < 0) fail("export", rc);
	if (fd != STDOUT_FILENO && close(fd) < 0) fail(argv[1], -errno);
	seccomp_release(ctx);
	return 0;
}
