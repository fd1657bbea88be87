"""The seccomp filter a sandbox installs just before the program's code runs.

Deny-list, answering EPERM: system calls an ordinary program (numpy, qiskit,
threads, a Python subprocess) never makes and that widen the kernel's attack
surface or undo the jail: mounts and namespaces, ptrace and cross-process
memory access, kernel modules and kexec, bpf, perf, the keyring,
userfaultfd, file handles, swap, reboot, accounting, the clock, I/O ports,
quotas. `clone` with a namespace flag is refused too, and `clone3` (whose
flags sit behind a pointer a filter cannot read) answers ENOSYS, so glibc
falls back to `clone`, as Docker's and systemd's filters do. Other
architectures' system calls (int 0x80 on x86_64) kill the process.

Mechanism: libseccomp (LGPL-2.1, loaded dynamically) through ctypes, in this
one small module. The PyPI bindings were considered: the official ones are
built from libseccomp's source tree and not published as a wheel,
`pyseccomp` (a ctypes wrapper) has had no release since 2021, the rest are
personal forks; the five C functions used here do not need one. The module
imports only the standard library: the sandbox imports it after the jail is
set up, and the executor runs it as a script (``--probe``) to find out at
start whether this host can filter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from typing import Any

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4
SCMP_CMP_MASKED_EQ = 7


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


# Refused with EPERM (names absent on this architecture, e.g. iopl on arm64, are skipped).
DENIED = (
    # mounts, namespaces, the root
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    # the kernel itself
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "syslog",
    "uselib",
    # the keyring
    "keyctl",
    "add_key",
    "request_key",
    # files by handle, bypassing paths
    "open_by_handle_at",
    "name_to_handle_at",
    # the host's settings
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "settimeofday",
    "clock_settime",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "vhangup",
)

# clone(2) flags that create namespaces (refused when any is set).
CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _library() -> Any:
    """libseccomp, or OSError saying it is missing."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    return lib


def _ok(result: int, what: str) -> None:
    if result < 0:  # libseccomp returns -errno
        raise OSError(-result, f"seccomp {what}: {os.strerror(-result)}")


def install() -> list[str]:
    """Install the filter on this process (every thread); returns the names denied.

    Sets no_new_privs (libseccomp does, and an unprivileged process needs it).
    Raises OSError when libseccomp or the kernel refuses.
    """
    lib = _library()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    denied: list[str] = []
    try:
        _ok(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 1), "no_new_privs")
        _ok(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1), "thread sync")
        _ok(lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS), "badarch")
        eperm = scmp_act_errno(errno.EPERM)
        for name in DENIED:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a system call on this architecture
            _ok(lib.seccomp_rule_add_array(ctx, eperm, nr, 0, None), f"rule {name}")
            denied.append(name)
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in CLONE_NAMESPACE_FLAGS:
            # clone's flags are its first argument on every architecture but s390.
            cmp = _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag)
            _ok(lib.seccomp_rule_add_array(ctx, eperm, clone, 1, ctypes.byref(cmp)), "clone")
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            enosys = scmp_act_errno(errno.ENOSYS)
            _ok(lib.seccomp_rule_add_array(ctx, enosys, clone3, 0, None), "clone3")
        _ok(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)
    return denied


def probe() -> None:
    """Install the filter here and check it answers: raises OSError naming what failed."""
    install()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) == 0 or ctypes.get_errno() != errno.EPERM:  # CLONE_NEWUSER
        raise OSError(errno.EINVAL, "the filter was loaded but unshare was not refused")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        try:
            probe()
        except OSError as exc:
            print(exc, file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    sys.exit(2)
