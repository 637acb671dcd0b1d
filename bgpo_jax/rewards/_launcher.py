"""Sandbox launcher: runs ONE untrusted Python program inside fresh Linux namespaces.

This file is executed as a script (`python -I -S _launcher.py HEX_MARSHAL_CONFIG`) by
`bgpo_jax.rewards.sandbox`; it imports only a few builtin modules (no json / signal / enum:
start-up time is most of a short run's cost), never the package, and cannot be influenced by
the parent's modules or environment.

Process tree (namespace mode, the default when running as root):

  launcher (root, original namespaces, process-group leader, killed by the parent on timeout)
    └─ init (root, PID 1 of a new PID namespace; new mount / network / IPC / UTS namespaces)
         └─ program (unprivileged per-run uid, rlimits, empty tmpfs cwd, stdin = /dev/null):
            `python -I [-S] -c BOOT prog.py FD`, the runner that reads the pass marker from
            pipe FD, closes it, runs prog.py and writes the marker only if it returned

The marker reaches the launcher through a pipe (config "marker_fd"), not its command line, and
the interpreter's installation directories ("expose") are mounted back read-only wherever the
private tmpfs mounts or the per-run uid would hide them (`_setup_mounts`).

When init exits the kernel SIGKILLs every process left in its PID namespace, so a fork bomb or
a daemonized grandchild can never outlive the run. The parent kills the launcher's process
group (launcher + init) on wall-clock timeout, which tears the namespace down the same way.

Status lines go to the file descriptor given in the config ("status_fd"):
  `mode <namespace|userns|basic>`, then `exit <code>` or `signal <n>`, or `error <message>`.
"""

import ctypes
import marshal
import os
import resource
import stat
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
# Directories every user may write to; each gets a fresh, small tmpfs inside the mount namespace.
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")

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


def _blocking_ancestor(path: str) -> str | None:
  """Topmost ancestor of `path` that others cannot traverse (e.g. /root, mode 0700)."""
  parts = path.strip("/").split("/")
  cur = ""
  for p in parts:
    cur += "/" + p
    try:
      if not os.stat(cur).st_mode & stat.S_IXOTH:
        return cur
    except OSError:
      return None
  return None


def _under(path: str, dirs) -> bool:
  return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


# statvfs f_flag bits -> mount flags a read-only re-bind must keep (the kernel refuses to
# clear flags it locked on a mount inherited into a user namespace).
_KEEP_FLAGS = ((8, MS_NOEXEC), (1024, 1024), (2048, 2048), (4096, 1 << 21))  # noexec, atimes


def _expose(keep: list, covered: list, blockers: list) -> None:
  """Mounts each kept interpreter directory (path, O_PATH fd opened before anything was
  covered) back read-only at its own path when a private tmpfs now hides it: one of the
  world-writable directories (a venv under /tmp), or a 0700 ancestor covered for the
  sandbox uid (a conda env under /root). Same path, so rpaths and venv symlinks keep working."""
  for p, fd in keep:
    if _under(p, covered) or _under(p, blockers):
      os.makedirs(p, mode=0o755, exist_ok=True)
      _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
      flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
      try:
        have = os.statvfs(p).f_flag
        for bit, flag in _KEEP_FLAGS:
          if have & bit:
            flags |= flag
      except OSError:
        pass
      _mount(None, p, None, flags)
    os.close(fd)


def _setup_mounts(cfg: dict, mode: str) -> None:
  _mount(None, "/", None, MS_REC | MS_PRIVATE)
  # Handles on the interpreter's directories first: the tmpfs mounts below may hide them.
  keep = []
  for p in cfg["expose"]:
    try:
      keep.append((p, os.open(p, os.O_PATH | os.O_DIRECTORY)))
    except OSError:
      pass
  size = f"size={cfg['tmpfs_mb']}m"
  covered = []
  for d in WORLD_WRITABLE:
    if os.path.isdir(d) and not os.path.islink(d):
      _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
      covered.append(d)
  blockers = []
  if mode == "namespace":  # the program runs under another uid: 0700 ancestors block it
    found = {_blocking_ancestor(p) for p, _ in keep if not _under(p, covered)}
    blockers = sorted(a for a in found if a is not None)
    for a in blockers:  # an empty tmpfs also hides the rest of that home directory
      _mount("tmpfs", a, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  # A /proc for the new PID namespace: other processes' /proc/<pid>/environ are not visible.
  _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  _expose(keep, covered, blockers)


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
      _setup_mounts(cfg, mode)
      cwd = WORKDIR
      os.mkdir(cwd, 0o700)
      with open(os.path.join(cwd, "prog.py"), "wb") as f:
        f.write(source)
      if mode == "namespace":
        os.chown(cwd, cfg["uid"], cfg["uid"])
        os.chown(os.path.join(cwd, "prog.py"), cfg["uid"], cfg["uid"])
    _status(sfd, f"mode {mode}")
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
