"""
The fake Nomad's exec with tty=true: runs argv on a real pseudo-terminal, as Docker's exec with a
TTY does, so the line discipline (echo, \r\n, ^C/^\, EOF) is the kernel's and not imitated.

  fd 0: stdin frames' bytes, written to the master    fd 1: the master's output (Nomad's stdout frames)
  fd 2: first line: the command's pid (session and group leader: the fake kills its group with the
        allocation), then errors                        fd 3: "rows cols" lines, from tty_size frames
Exits with the command's status, or 128 + the signal that killed it. The command is the session
leader (the terminal is hung up when it exits), so output is read until that hangup (EIO).
"""
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import termios


def resize(fd, line):
    try:
        rows, cols = (int(value) for value in line.split())
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))
    except (ValueError, OSError):
        pass


def main():
    master, slave = os.openpty()  # 0x0 like a fresh Docker exec TTY until a tty_size frame
    pid = os.fork()
    if pid == 0:
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.closerange(3, 1024)
        try:
            os.execvp(sys.argv[1], sys.argv[1:])
        except OSError as error:
            os.write(2, f'exec: "{sys.argv[1]}": {error.strerror}\r\n'.encode())
            os._exit(127 if error.errno == errno.ENOENT else 126)
    os.close(slave)
    os.write(2, f'{pid}\n'.encode())
    control = b''
    inputs = [0, 3, master]
    while master in inputs:
        readable, _, _ = select.select(inputs, [], [])
        for fd in readable:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b''
            if fd == master:
                if data:
                    os.write(1, data)
                else:
                    inputs.remove(master)  # EIO: every slave closed or hung up
            elif fd == 0:
                if data:
                    os.write(master, data)
                else:
                    inputs.remove(0)  # `stdin close`: the terminal stays, as it does in a container
            else:
                if not data:
                    inputs.remove(3)
                control += data
                while b'\n' in control:
                    line, control = control.split(b'\n', 1)
                    resize(master, line.decode())
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


signal.signal(signal.SIGPIPE, signal.SIG_DFL)
main()
