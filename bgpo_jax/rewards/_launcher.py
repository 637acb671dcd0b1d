"""Sandbox launcher: runs ONE untrusted Python program inside fresh Linux namespaces.

This file is executed as a script (`python -I -S _launcher.py HEX_MARSHAL_CONFIG`) by
`bgpo_jax.rewards.sandbox`; it imports only a few builtin modules (no json / signal / enum:
start-up time is most of a short run's cost), never the package, and cannot be influenced by
the parent's modules or environment.

Process tree (namespace mode, the default when running as root):

  launcher (root, original namespaces, process-group leader, killed by the parent on timeout)
    └─ init (root, PID 1 of a new PID namespace; new mount / network / IPC / UTS namespaces)
         └─ program (unprivileged per-run uid, rlimits, seccomp, empty tmpfs cwd, stdin =
            /dev/null): `python -I [-S] -c BOOT prog.py FD BASIC *boot_args`, the runner
            (sandbox's marker runner, or the judge's call server, which ignores the marker)

init builds the program's root filesystem before it forks (`_setup_mounts`: system
directories, the interpreter's installation directories ("expose") and a few devices,
read-only, plus scratch tmpfs mounts), then pivots into it. The marker reaches the launcher
through a pipe (config "marker_fd"), not its command line.

When init exits the kernel SIGKILLs every process left in its PID namespace, so a fork bomb or
a daemonized grandchild can never outlive the run. The parent kills the launcher's process
group (launcher + init) on wall-clock timeout, which tears the namespace down the same way.

Status lines go to the file descriptor given in the config ("status_fd"):
  `mode <namespace|userns|basic>`, `seccomp <on|off>`, then `exit <code>` or `signal <n>`, or
  `error <message>`.
"""

import ctypes
import marshal
import os
import resource
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SIGKILL = 9
WORKDIR = "/tmp/sandbox"

# The main program's symbol namespace includes libc (find_library would spawn ldconfig: slow).
_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
  pass


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(src, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()
  _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
         f"mount {target}")


def _status(fd: int, line: str) -> None:
  try:
    os.write(fd, (line + "\n").encode())
  except OSError:
    pass


def _die_with_parent() -> None:
  _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)


def _under(path: str, dirs) -> bool:
  return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


# System directories the interpreter may need, bound read-only into the sandbox's own root (or
# recreated as the same symlink, e.g. /bin -> usr/bin on a merged-/usr system). Nothing else of the
# host's filesystem exists there: no /home, /root, /work, /data, /run (no host UNIX sockets), /mnt.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")


# statvfs f_flag bits -> mount flags a read-only re-bind must keep (the kernel refuses to
# clear flags it locked on a mount inherited into a user namespace).
_KEEP_FLAGS = ((8, MS_NOEXEC), (1024, 1024), (2048, 2048), (4096, 1 << 21))  # noexec, atimes


def _bind_ro(fd: int, target: str) -> None:
  """Binds the directory or file open as O_PATH `fd` at `target`, then makes it read-only."""
  _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
  flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
  try:
    have = os.statvfs(target).f_flag
    for bit, flag in _KEEP_FLAGS:
      if have & bit:
        flags |= flag
    if have & 4:  # ST_NODEV
      flags |= MS_NODEV
  except OSError:
    pass
  _mount(None, target, None, flags)


def _pivot_root(new_root: str) -> None:
  """Makes `new_root` the root of this mount namespace and detaches the old one entirely (the
  pivot_root(".", ".") idiom: no directory of the old root stays reachable)."""
  nr = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
  if nr is None:
    raise SetupError(f"pivot_root: unsupported machine {os.uname().machine}")
  os.chdir(new_root)
  _check(_libc.syscall(nr, b".", b"."), "pivot_root")
  _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
  os.chdir("/")


def _setup_mounts(cfg: dict) -> None:
  """Builds the sandbox's filesystem: a fresh root holding only the system directories, the
  interpreter's installation ("expose") and a few device nodes, all read-only; fresh tmpfs
  mounts for /tmp, /var/tmp and /dev/shm; a /proc of the new PID namespace. The host's data
  (the dataset, the checkpoint, this source tree), its home directories and /run never exist
  inside, so a program cannot read expected values off the disk or reach a host UNIX socket."""
  _mount(None, "/", None, MS_REC | MS_PRIVATE)
  # O_PATH handles first: the new root's tmpfs is mounted over /tmp, which may hold the venv.
  sources = []  # (path in the new root, fd, kind)
  for d in SYSTEM_DIRS:
    if os.path.islink(d):
      sources.append((d, os.readlink(d), "link"))
    elif os.path.isdir(d):
      sources.append((d, os.open(d, os.O_PATH | os.O_DIRECTORY), "dir"))
  for p in cfg["expose"]:
    if not _under(p, SYSTEM_DIRS):
      try:
        sources.append((p, os.open(p, os.O_PATH | os.O_DIRECTORY), "dir"))
      except OSError:
        pass
  for name in DEVICES:
    try:
      sources.append((f"/dev/{name}", os.open(f"/dev/{name}", os.O_PATH), "file"))
    except OSError:
      pass
  root = "/tmp"
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  # Scratch space first: an interpreter under /tmp is bound inside the fresh /tmp.
  size = f"size={cfg['tmpfs_mb']}m"
  for d in ("/tmp", "/var/tmp", "/dev/shm", "/proc"):
    os.makedirs(root + d, mode=0o755, exist_ok=True)
  _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  for d in ("/tmp", "/var/tmp", "/dev/shm"):
    _mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
  for path, src, kind in sorted(sources, key=lambda s: s[0].count("/")):
    target = root + path
    if kind == "link":
      os.symlink(src, target)
      continue
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if kind == "dir":
      os.makedirs(target, mode=0o755, exist_ok=True)
    else:
      open(target, "wb").close()
    _bind_ro(src, target)
    os.close(src)
  for d in cfg.get("hide", ()):  # site-packages of the interpreter: hidden unless asked for
    if os.path.isdir(root + d):
      _mount("tmpfs", root + d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
  for link, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(dest, f"{root}/dev/{link}")
  _pivot_root(root)
  _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


# seccomp: system calls the program may not make, by machine (x86_64, aarch64 numbers).
# Fail with EPERM: new user namespaces (clone / unshare with CLONE_NEWUSER; clone3's flags sit in
# memory a filter cannot read, so it gets ENOSYS and the C library falls back to clone), joining
# namespaces, UNIX sockets (none of the host's exist inside the sandbox's root; the rule also
# covers one that a later mount could expose; socketpair stays allowed), io_uring (its requests
# would bypass these checks), and kernel interfaces no test needs (bpf, perf, keyrings, ptrace and
# cross-process memory access, mounting, modules).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name: (x86_64, aarch64)
    "clone": (56, 220), "unshare": (272, 97), "clone3": (435, 435), "socket": (41, 198),
    "setns": (308, 268), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "bpf": (321, 280), "userfaultfd": (323, 282),
    "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "kexec_load": (246, 104),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
}
_ALWAYS_DENIED = ("setns", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
                  "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key", "ptrace",
                  "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
                  "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
                  "mount_setattr", "init_module", "finit_module", "delete_module", "kexec_load",
                  "open_by_handle_at", "name_to_handle_at")
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS, _AF_UNIX = 1, 38, 1


def _seccomp_program() -> bytes | None:
  """The classic-BPF filter (struct sock_filter[]) for this machine, None where unsupported."""
  machine = os.uname().machine
  if machine not in _AUDIT_ARCH:
    return None
  col = 0 if machine == "x86_64" else 1
  nr = {k: v[col] for k, v in _SYSCALLS.items()}
  ld = lambda off: (0x20, "", "", off)  # BPF_LD | BPF_W | BPF_ABS
  jeq = lambda k, t, f="": (0x15, t, f, k)  # BPF_JMP | BPF_JEQ | BPF_K
  ret = lambda v: (0x06, "", "", v)  # BPF_RET | BPF_K
  prog = [ld(4), jeq(_AUDIT_ARCH[machine], "", "deny"), ld(0)]
  if machine == "x86_64":
    prog.append((0x35, "deny", "", 0x40000000))  # BPF_JGE: the x32 ABI's numbers
  prog += [jeq(nr[n], "deny") for n in _ALWAYS_DENIED]
  prog += [jeq(nr["clone3"], "nosys"), jeq(nr["clone"], "flags"), jeq(nr["unshare"], "flags"),
           jeq(nr["socket"], "family"), ret(_RET_ALLOW),
           "flags", ld(16), (0x45, "deny", "", CLONE_NEWUSER), ret(_RET_ALLOW),  # BPF_JSET
           "family", ld(16), jeq(_AF_UNIX, "deny"), ret(_RET_ALLOW),
           "nosys", ret(_RET_ERRNO | _ENOSYS), "deny", ret(_RET_ERRNO | _EPERM)]
  labels, pc = {}, 0
  for ins in prog:
    if isinstance(ins, str):
      labels[ins] = pc
    else:
      pc += 1
  out, pc = [], 0
  for ins in prog:
    if isinstance(ins, str):
      continue
    code, t, f, k = ins
    jt = labels[t] - pc - 1 if t else 0
    jf = labels[f] - pc - 1 if f else 0
    out.append(code.to_bytes(2, "little") + bytes((jt, jf)) + k.to_bytes(4, "little"))
    pc += 1
  return b"".join(out)


def _install_seccomp(program: bytes) -> None:
  """no_new_privs (also keeps setuid binaries from raising privileges) + the filter; inherited
  by every process the program starts and kept across execve."""
  buf = ctypes.create_string_buffer(program, len(program))

  class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

  fprog = _Prog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
  _check(_libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
  _check(_libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


def _set_limits(cfg: dict) -> None:
  cpu = int(cfg["cpu_s"])
  mem = int(cfg["memory_mb"]) * 1024 * 1024
  fsize = int(cfg["fsize_mb"]) * 1024 * 1024
  for res, lim in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                   (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_CORE, (0, 0)),
                   (resource.RLIMIT_NOFILE, (256, 256))):
    resource.setrlimit(res, lim)
  if cfg["nproc"] is not None:
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))


def _exec_program(cfg: dict, mode: str, cwd: str, marker: bytes) -> None:
  """In the forked program child: limits, privileges, then exec. Never returns."""
  try:
    os.chdir(cwd)
    try:
      with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # the OOM killer picks sandboxed code first
    except OSError:
      pass
    _set_limits(cfg)
    if mode == "namespace":
      os.setgroups([])
      os.setgid(cfg["uid"])
      os.setuid(cfg["uid"])
    _die_with_parent()  # cleared by setuid, so set it afterwards
    if cfg.get("seccomp_program"):
      _install_seccomp(cfg["seccomp_program"])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8"}
    # The pass marker reaches the runner through a pipe it reads (and closes) before the
    # program starts: it is in no file, argument or environment variable the program can read.
    r, w = os.pipe()
    os.write(w, marker)
    os.close(w)
    os.set_inheritable(r, True)
    argv = [cfg["python"], "-I"] + ([] if cfg["site_packages"] else ["-S"])
    argv += ["-c", cfg["boot"], "prog.py", str(r), "1" if mode == "basic" else "0"]
    argv += [str(a) for a in cfg.get("boot_args", ())]
    os.execve(cfg["python"], argv, env)
  except BaseException as e:  # noqa: BLE001 - report anything, then die
    os.write(2, f"bgpo-sandbox: exec failed: {e!r}\n".encode())
  os._exit(127)


def _wait_main(child: int) -> int:
  """Reaps every child (init adopts orphans) until `child` exits; returns its wait status."""
  while True:
    try:
      pid, st = os.wait()
    except ChildProcessError:
      return 0
    except InterruptedError:
      continue
    if pid == child:
      return st


def _init(cfg: dict, mode: str, source: bytes, marker: bytes) -> None:
  """PID 1 of the new namespace (or a plain child in basic mode). Never returns."""
  sfd = cfg["status_fd"]
  try:
    _die_with_parent()
    os.umask(0o022)
    if mode == "basic":
      cwd = cfg["dir"]
    else:
      _setup_mounts(cfg)
      cwd = WORKDIR
      os.mkdir(cwd, 0o700)
      with open(os.path.join(cwd, "prog.py"), "wb") as f:
        f.write(source)
      if mode == "namespace":
        os.chown(cwd, cfg["uid"], cfg["uid"])
        os.chown(os.path.join(cwd, "prog.py"), cfg["uid"], cfg["uid"])
    _status(sfd, f"mode {mode}")
    if cfg["seccomp"] != "off":
      cfg["seccomp_program"] = _seccomp_program()
      if cfg["seccomp_program"] is None and cfg["seccomp"] == "on":
        raise SetupError(f"seccomp: no filter for machine {os.uname().machine}")
    _status(sfd, f"seccomp {'on' if cfg.get('seccomp_program') else 'off'}")
    child = os.fork()
    if child == 0:
      os.close(sfd)
      _exec_program(cfg, mode, cwd, marker)
    st = _wait_main(child)
    if os.WIFSIGNALED(st):
      _status(sfd, f"signal {os.WTERMSIG(st)}")
    else:
      _status(sfd, f"exit {os.waitstatus_to_exitcode(st)}")
  except BaseException as e:  # noqa: BLE001
    _status(sfd, f"error {e!r}")
    os._exit(125)
  os._exit(0)


def _read_marker(fd: int) -> bytes:
  """The pass marker the parent wrote into pipe `fd` (then closed): it never appears in this
  launcher's command line, which a basic-mode program could read from /proc."""
  buf = b""
  while True:
    chunk = os.read(fd, 4096)
    if not chunk:
      break
    buf += chunk
  os.close(fd)
  return buf


def _our_cgroups() -> list[tuple[str, str]]:
  """[(kind, dir)] of this process's cgroups: kind "memory"/"pids" (v1) or "unified" (v2)."""
  mounts = {}
  with open("/proc/self/mountinfo") as f:
    for line in f:
      left, _, right = line.partition(" - ")
      fields, rest = left.split(), right.split()
      if len(fields) < 5 or len(rest) < 3:
        continue
      if rest[0] == "cgroup":
        for c in rest[2].split(","):
          mounts.setdefault(c, (fields[4], fields[3]))
      elif rest[0] == "cgroup2":
        mounts.setdefault("", (fields[4], fields[3]))
  out = []
  with open("/proc/self/cgroup") as f:
    for line in f:
      _, ctrls, path = line.rstrip("\n").split(":", 2)
      for c in (ctrls.split(",") if ctrls else [""]):
        if c in ("memory", "pids", "") and c in mounts:
          mnt, root = mounts[c]
          if root != "/" and path.startswith(root):
            path = path[len(root):]
          out.append((c or "unified", (mnt.rstrip("/") + "/" + path.strip("/")).rstrip("/")))
  return out


def _put(path: str, text: str) -> bool:
  try:
    with open(path, "w") as f:
      f.write(text)
    return True
  except OSError:
    return False


class _Cgroups:
  """Best-effort per-run cgroups capping the memory and task count of the WHOLE run (rlimits
  are per process: a fork bomb of big allocations could otherwise exceed the machine's RAM).
  The launcher joins them before forking, so init and the program inherit them; afterwards it
  moves back and removes them. Silently skipped where cgroups are not writable."""

  def __init__(self, memory_bytes: int, pids: int):
    self.made: list[tuple[str, str, str]] = []  # (kind, dir, parent dir)
    try:
      groups = _our_cgroups()
    except OSError:
      return
    have_v1 = {k for k, _ in groups}
    for kind, parent in groups:
      if kind == "unified" and ("memory" in have_v1 or "pids" in have_v1):
        continue  # hybrid hierarchy: the v1 controllers do the work
      d = f"{parent}/bgpo-sandbox-{os.getpid()}"
      try:
        os.mkdir(d)
      except OSError:
        continue
      ok = False
      if kind == "memory":
        ok = _put(f"{d}/memory.limit_in_bytes", str(memory_bytes))
        _put(f"{d}/memory.memsw.limit_in_bytes", str(memory_bytes))
      elif kind == "pids":
        ok = _put(f"{d}/pids.max", str(pids))
      else:
        ok = _put(f"{d}/memory.max", str(memory_bytes))
        ok = _put(f"{d}/pids.max", str(pids)) or ok
        _put(f"{d}/memory.swap.max", "0")
      if ok and _put(f"{d}/cgroup.procs", str(os.getpid())):
        self.made.append((kind, d, parent))
      else:
        _kill_and_rmdir(d)

  def kinds(self) -> str:
    return ",".join(k for k, _, _ in self.made) or "none"

  def oom_killed(self) -> bool:
    for kind, d, _ in self.made:
      name = {"memory": "memory.oom_control", "unified": "memory.events"}.get(kind)
      try:
        with open(f"{d}/{name}") as f:
          for line in f:
            key, _, val = line.partition(" ")
            if key == "oom_kill" and int(val) > 0:
              return True
      except (OSError, TypeError, ValueError):
        pass
    return False

  def remove(self) -> None:
    for _, d, parent in self.made:
      _put(f"{parent}/cgroup.procs", str(os.getpid()))
    for _, d, _ in self.made:
      _kill_and_rmdir(d)


def _kill_and_rmdir(d: str) -> None:
  """Kills whatever is left in cgroup `d` (basic mode: daemonized children) and removes it."""
  for _ in range(200):
    try:
      with open(f"{d}/cgroup.procs") as f:
        pids = [int(p) for p in f.read().split()]
    except FileNotFoundError:
      return
    except (OSError, ValueError):
      pids = []
    for p in pids:
      try:
        os.kill(p, SIGKILL)
      except OSError:
        pass
    try:
      os.rmdir(d)
      return
    except FileNotFoundError:
      return
    except OSError:
      time.sleep(0.01)  # the last tasks may still be exiting


def _count_tasks(uid: int) -> int:
  """Tasks (processes + threads) of `uid`: RLIMIT_NPROC counts all of them, system-wide."""
  n = 0
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      try:
        if os.stat(f"/proc/{pid}").st_uid == uid:
          n += len(os.listdir(f"/proc/{pid}/task"))
      except OSError:
        pass
  return n


def main() -> None:
  cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
  sfd = cfg["status_fd"]
  run_tasks = int(cfg["nproc"]) + 8  # cgroup task cap: the program's budget + launcher + init
  os.set_inheritable(sfd, False)
  _die_with_parent()
  if os.getppid() != cfg["parent_pid"]:
    os._exit(125)  # the parent is already gone
  with open(os.path.join(cfg["dir"], "prog.py"), "rb") as f:
    source = f.read()
  marker = _read_marker(cfg.pop("marker_fd"))
  ns = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
  mode = "basic"
  if cfg["isolation"] != "basic":
    if os.geteuid() == 0 and _libc.unshare(ns) == 0:
      mode = "namespace"
    elif os.geteuid() != 0 and cfg["isolation"] == "auto":
      # Unprivileged: a user namespace maps our own uid (not 0, so exec drops the
      # namespace capabilities) and lets init mount its private /tmp and /proc.
      uid, gid = os.getuid(), os.getgid()
      if _libc.unshare(ns | CLONE_NEWUSER) == 0:
        try:
          with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
          with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
          with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
          mode = "userns"
        except OSError as e:
          _status(sfd, f"error user namespace maps: {e!r}")
          os._exit(125)
    if mode != "namespace" and cfg["isolation"] == "namespace":
      _status(sfd, "error full isolation needs root with namespace support (CAP_SYS_ADMIN)")
      os._exit(125)
  if mode != "namespace":
    # Same uid as the parent: RLIMIT_NPROC counts all of that user's tasks, so allow `nproc`
    # more than now (root is exempt anyway). (userns still needs `expose`: its private /tmp
    # hides an interpreter installed there.)
    cfg["nproc"] = None if os.geteuid() == 0 else cfg["nproc"] + _count_tasks(os.getuid())
  cgroups = None
  if os.geteuid() == 0:
    cgroups = _Cgroups(cfg["cgroup_mb"] * 1024 * 1024, run_tasks)
    _status(sfd, f"cgroup {cgroups.kinds()}")
    for _, d, _ in cgroups.made:
      _status(sfd, f"cgdir {d}")  # the parent removes it if we get killed
  pid = os.fork()
  if pid == 0:
    _init(cfg, mode, source, marker)
  st = _wait_main(pid)
  if cgroups is not None:
    if cgroups.oom_killed():
      _status(sfd, "oom 1")
    cgroups.remove()
  os._exit(os.waitstatus_to_exitcode(st) & 0xFF if os.WIFEXITED(st) else 125)


if __name__ == "__main__":
  main()
