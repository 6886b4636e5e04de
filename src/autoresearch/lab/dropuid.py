"""Inside a sandbox that a root lab made: become a fresh unprivileged uid, then run the command.

    python -m autoresearch.lab.dropuid UID -- COMMAND...

bwrap, run by root, sets up the namespaces and mounts and leaves this process only the two
capabilities it needs to change its ids; setresuid to a non-zero uid clears them, and bwrap's
no_new_privs keeps setuid programs from giving any back.
"""
import os
import sys


def main() -> None:
    uid = int(sys.argv[1])
    if sys.argv[2] != "--" or uid <= 0:
        sys.exit("usage: python -m autoresearch.lab.dropuid UID -- COMMAND...")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    os.execvp(sys.argv[3], sys.argv[3:])


if __name__ == "__main__":
    main()
