/*
 * The ceiling for output that goes through a terminal: runs `sh -c COMMAND` as a session leader
 * on a fresh pty (default termios, as a login shell would have it) and reads the master in 64 KiB
 * reads until the slave side hangs up. Prints the byte count. The bench compiles it on first use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 2) { fprintf(stderr, "usage: terminal-read COMMAND\n"); return 2; }
	int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	int slave;
	if (master < 0 || unlockpt(master) < 0 || (slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY)) < 0) { perror("pty"); return 1; }
	pid_t pid = fork();
	if (pid < 0) { perror("fork"); return 1; }
	if (pid == 0) {
		if (setsid() < 0 || ioctl(slave, TIOCSCTTY, 0) < 0) _exit(127);
		dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
		if (slave > 2) close(slave);
		execl("/bin/sh", "sh", "-c", argv[1], (char *)NULL);
		_exit(127);
	}
	close(slave);
	static char buf[65536];
	long long total = 0;
	for (;;) {
		ssize_t n = read(master, buf, sizeof buf);
		if (n > 0) { total += n; continue; }
		if (n < 0 && errno == EINTR) continue;
		break; /* EIO: every slave fd is closed */
	}
	int status;
	waitpid(pid, &status, 0);
	printf("%lld\n", total);
	return 0;
}
