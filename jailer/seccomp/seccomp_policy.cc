#include "jailer/seccomp/seccomp_policy.h"

#include <fcntl.h>
// As vmm-core/kvm/kvm_uapi.h: Debian 12's headers declare flexible arrays in a way that, in C++,
// changes the struct sizes encoded in ioctl numbers (KVM_SET_GSI_ROUTING, KVM_SET_MSRS...).
// Filter the numbers the core really uses, which are the kernel's.
#include <linux/stddef.h>
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]
#include <linux/kvm.h>
#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <linux/vfio.h>
// Without legacy vring helpers: <linux/virtio_ring.h>'s inline C does not compile as C++.
#define VIRTIO_RING_NO_LEGACY
#include <linux/vhost.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <unistd.h>
#include <linux/fs.h>
#include <linux/if_tun.h>

#include <seccomp.h>

#include <cerrno>
#include <ctime>
#include <memory>

#include "common/error.h"

namespace clonevm::seccomp {
namespace {

constexpr uint64_t kAll32 = 0xffffffffu;

static_assert(KVM_SET_GSI_ROUTING == 0x4008ae6a, "ioctl numbers must match the kernel's");
static_assert(KVM_SET_MSRS == 0x4008ae89, "ioctl numbers must match the kernel's");
static_assert(VHOST_SET_MEM_TABLE == 0x4008af03, "ioctl numbers must match the kernel's");

// What every threaded C++ process of ours does in its steady state (glibc, libstdc++, spdlog,
// kj's event loop). Anything that reaches outside the process (open, socket, exec) is not here.
constexpr SyscallRule kCommon[] = {
    {"read", "read fds it already holds (sockets, eventfds, stdin)"},
    {"readv", "scatter reads (kj, vhost-user messages)"},
    {"write", "write fds it already holds; logging to stderr"},
    {"writev", "gather writes (kj, spdlog)"},
    {"close", "release fds (a reconnecting peer, a finished request)"},
    {"fcntl", "F_GETFL/F_SETFL O_NONBLOCK and F_GETFD/F_SETFD on fds it holds"},
    {"dup", "kj duplicates fds received over unix sockets"},
    {"dup3", "as dup"},
    {"fstat", "size of an fd it holds (memfd region size checks)"},
    {"newfstatat", "glibc's fstat is newfstatat(fd, \"\", AT_EMPTY_PATH)"},
    {"lseek", "stdio on fds it holds"},
    {"mmap", "malloc arenas, thread stacks, fds it holds (memfd regions)"},
    {"munmap", "free the above"},
    {"mprotect", "thread stack guard pages, malloc"},
    {"mremap", "realloc of large blocks"},
    {"madvise", "malloc trimming (MADV_DONTNEED), thread stack release on exit"},
    {"brk", "malloc"},
    {"futex", "mutexes and condition variables"},
    {"set_robust_list", "every new thread"},
    {"get_robust_list", "glibc on thread exit"},
    {"rseq", "every new thread (glibc 2.35+)"},
    {"clone", "new threads only: the flags must include CLONE_THREAD", 0, CLONE_THREAD,
     CLONE_THREAD},
    {"sched_getaffinity", "std::thread::hardware_concurrency"},
    {"sched_yield", "spin loops in locks"},
    {"rt_sigaction", "signal handlers (vCPU kick, SIGPIPE ignore)"},
    {"rt_sigprocmask", "block signals around thread creation"},
    {"rt_sigreturn", "return from a signal handler"},
    {"sigaltstack", "glibc thread setup"},
    {"gettid", "logging, thread ids"},
    {"getpid", "logging"},
    {"tgkill", "kick one of its own threads (pthread_kill); raise() for abort: its own thread "
               "group only (forks of one fork server share a pid namespace and a uid)",
     0, kAll32, kThisProcess},
    {"clock_gettime", "timers when the vDSO is unavailable"},
    {"clock_nanosleep", "sleeps"},
    {"nanosleep", "sleeps"},
    {"gettimeofday", "spdlog timestamps without the vDSO"},
    {"epoll_create1", "kj event loops"},
    {"epoll_ctl", "kj event loops"},
    {"epoll_wait", "kj event loops"},
    {"epoll_pwait", "kj event loops"},
    {"poll", "waiting for one fd"},
    {"ppoll", "waiting for fds"},
    {"eventfd2", "kj cross-thread wakeups"},
    {"timerfd_create", "kj timers"},
    {"timerfd_settime", "kj timers"},
    {"pipe2", "kj cross-thread wakeups"},
    {"recvmsg", "unix-socket messages with fds (vhost-user, Cap'n Proto)"},
    {"sendmsg", "as recvmsg"},
    {"recvfrom", "plain reads on a socket"},
    {"sendto", "plain writes on a socket"},
    {"shutdown", "end a connection"},
    {"getsockopt", "SO_ERROR after a nonblocking connect, SO_PEERCRED"},
    {"setsockopt", "buffer sizes"},
    {"getrandom", "hash seeds, std::random_device"},
    {"prctl", "PR_SET_NAME only: thread names", 0, kAll32, PR_SET_NAME},
    {"exit", "a thread ends"},
    {"exit_group", "the process ends"},
    {"restart_syscall", "a sleep interrupted by a signal"},
};

// clone-vmm after its setup: KVM VM, vCPUs, memory and devices exist; the vCPUs are about to run.
constexpr SyscallRule kVmm[] = {
    {"ioctl", "KVM, terminal and socket requests, filtered by request number (kVmmIoctls)"},
    {"accept4", "API socket: a new client"},
    {"socket", "AF_UNIX only: reconnect to a vhost-user back-end", 0, kAll32, AF_UNIX},
    {"connect", "as socket"},
    {"fallocate", "punch holes in the guest memfd for pages the guest frees"},
    {"unlink", "remove the API socket on exit (one it created: --api-socket without --api-fd)"},
    {"unlinkat", "as unlink"},
    {"openat", "snapshot: create the template files in the directory fd `clone snapshot` "
               "sends; a fork's working-set file and, for a copy-on-write fork, "
               "/proc/self/pagemap to record it"},
    {"pread64", "snapshot: read guest memory from the memfd; a copy-on-write fork's page map"},
    {"pwrite64", "snapshot: write the template files; a fork's working-set file"},
    {"ftruncate", "snapshot: size the sparse memory image"},
    {"fchmod", "snapshot: make the memory image read-only"},
    {"linkat", "fork: put the working-set file in place only if no other fork did"},
};

constexpr IoctlRule kVmmIoctls[] = {
    {KVM_RUN, "KVM_RUN", "run a vCPU"},
    {KVM_GET_REGS, "KVM_GET_REGS", "exit handling, snapshot"},
    {KVM_SET_REGS, "KVM_SET_REGS", "reset, restore"},
    {KVM_GET_SREGS, "KVM_GET_SREGS", "exit handling, snapshot"},
    {KVM_SET_SREGS, "KVM_SET_SREGS", "reset, restore"},
    {KVM_GET_FPU, "KVM_GET_FPU", "snapshot"},
    {KVM_SET_FPU, "KVM_SET_FPU", "restore"},
    {KVM_GET_MSRS, "KVM_GET_MSRS", "snapshot"},
    {KVM_SET_MSRS, "KVM_SET_MSRS", "restore"},
    {KVM_GET_LAPIC, "KVM_GET_LAPIC", "snapshot"},
    {KVM_SET_LAPIC, "KVM_SET_LAPIC", "restore"},
    {KVM_GET_MP_STATE, "KVM_GET_MP_STATE", "snapshot"},
    {KVM_SET_MP_STATE, "KVM_SET_MP_STATE", "restore"},
    {KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", "snapshot"},
    {KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", "restore"},
    {KVM_IRQ_LINE, "KVM_IRQ_LINE", "legacy interrupts (serial, ACPI SCI)"},
    {KVM_IRQFD, "KVM_IRQFD", "wire a device's interrupt eventfd when the guest enables MSI-X"},
    {KVM_IOEVENTFD, "KVM_IOEVENTFD", "wire a queue notify address when the guest enables a queue"},
    {KVM_SET_GSI_ROUTING, "KVM_SET_GSI_ROUTING", "MSI routes the guest programs into MSI-X"},
    {KVM_SIGNAL_MSI, "KVM_SIGNAL_MSI", "inject an MSI from the core"},
    {KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", "(un)map memory while running"},
    {KVM_GET_CLOCK, "KVM_GET_CLOCK", "snapshot"},
    {KVM_SET_CLOCK, "KVM_SET_CLOCK", "restore"},
    {KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", "snapshot PIC/IOAPIC"},
    {KVM_SET_IRQCHIP, "KVM_SET_IRQCHIP", "restore PIC/IOAPIC"},
    {KVM_GET_PIT2, "KVM_GET_PIT2", "snapshot"},
    {KVM_SET_PIT2, "KVM_SET_PIT2", "restore"},
    {KVM_KVMCLOCK_CTRL, "KVM_KVMCLOCK_CTRL", "tell the guest it was paused"},
    {KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST", "snapshot: the MSRs to save"},
    {KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", "snapshot: XSAVE area size (KVM_CAP_XSAVE2)"},
    {KVM_GET_XSAVE, "KVM_GET_XSAVE", "snapshot: XSAVE area up to 4 KiB"},
    {KVM_GET_XSAVE2, "KVM_GET_XSAVE2", "snapshot: XSAVE area over 4 KiB (AMX)"},
    {KVM_GET_XCRS, "KVM_GET_XCRS", "snapshot"},
    {KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", "snapshot"},
    {UFFDIO_COPY, "UFFDIO_COPY", "fork: fill a faulting chunk from the template's memory"},
    {UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", "fork: fill a faulting chunk of a template hole"},
    {UFFDIO_WAKE, "UFFDIO_WAKE",
     "fork: wake a thread whose page another fault or a prefetch filled first"},
    {UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER",
     "fork filled up front: its holes go to the kernel's own shmem faults"},
    {VHOST_SET_OWNER, "VHOST_SET_OWNER", "vsock: bind /dev/vhost-vsock to this process's mm"},
    {VHOST_GET_FEATURES, "VHOST_GET_FEATURES", "vsock: features the kernel device offers"},
    {VHOST_SET_FEATURES, "VHOST_SET_FEATURES", "vsock: features the guest driver accepted"},
    {VHOST_SET_MEM_TABLE, "VHOST_SET_MEM_TABLE", "vsock: guest memory regions for the kernel"},
    {VHOST_SET_VRING_NUM, "VHOST_SET_VRING_NUM", "vsock: queue size when the driver starts"},
    {VHOST_SET_VRING_ADDR, "VHOST_SET_VRING_ADDR", "vsock: ring addresses"},
    {VHOST_SET_VRING_BASE, "VHOST_SET_VRING_BASE", "vsock: ring position (start, restore)"},
    {VHOST_GET_VRING_BASE, "VHOST_GET_VRING_BASE", "vsock: ring position (reset, snapshot)"},
    {VHOST_SET_VRING_KICK, "VHOST_SET_VRING_KICK", "vsock: the queue's ioeventfd"},
    {VHOST_SET_VRING_CALL, "VHOST_SET_VRING_CALL", "vsock: the queue's irqfd"},
    {VHOST_VSOCK_SET_GUEST_CID, "VHOST_VSOCK_SET_GUEST_CID", "vsock: the CID (boot, fork)"},
    {VHOST_VSOCK_SET_RUNNING, "VHOST_VSOCK_SET_RUNNING", "vsock: start/stop with DRIVER_OK/reset"},
    {TCGETS, "TCGETS", "console: read terminal mode (isatty)"},
    {TCSETS, "TCSETS", "console: restore terminal mode on exit"},
    {TCSETSW, "TCSETSW", "as TCSETS"},
    {TCSETSF, "TCSETSF", "as TCSETS"},
    {TIOCGWINSZ, "TIOCGWINSZ", "console size"},
    {FIONBIO, "FIONBIO", "kj sets O_NONBLOCK this way"},
    {FIOCLEX, "FIOCLEX", "kj sets close-on-exec this way"},
};

// clone-block after setup: its image files are open, its socket listens, io_uring exists.
// Its listening sockets exist before the lockdown, so it needs accept4 but no socket().
constexpr SyscallRule kBlock[] = {
    {"ioctl", "block-device size queries and kj's FIONBIO/FIOCLEX (kBlockIoctls)"},
    {"accept4", "the front-end connects to the vhost-user socket; clients of --control-socket"},
    {"memfd_create", "GET_INFLIGHT_FD: the inflight area the front-end keeps across restarts"},
    {"unlink", "remove the --control-socket on exit"},
    {"io_uring_enter", "submit and reap disk I/O"},
    {"io_uring_register", "register the image fds and buffers"},
    {"pread64", "image I/O without io_uring; qcow2 metadata"},
    {"pwrite64", "as pread64"},
    {"preadv", "as pread64"},
    {"pwritev", "as pread64"},
    {"preadv2", "as pread64"},
    {"pwritev2", "as pread64"},
    {"fsync", "guest flush"},
    {"fdatasync", "guest flush"},
    {"fallocate", "discard and write-zeroes; qcow2 cluster allocation"},
    {"ftruncate", "qcow2 grows its file"},
    {"rt_sigtimedwait", "the stop thread's sigwait for SIGTERM/SIGINT (dev-block/main.cc)"},
};

constexpr IoctlRule kBlockIoctls[] = {
    {BLKGETSIZE64, "BLKGETSIZE64", "size of a raw block device image"},
    {BLKSSZGET, "BLKSSZGET", "logical sector size of a block device"},
    {USERFAULTFD_IOC_NEW, "USERFAULTFD_IOC_NEW",
     "--userfaultfd: a userfaultfd for the front-end's POSTCOPY_ADVISE"},
    {UFFDIO_API, "UFFDIO_API", "--userfaultfd: the new userfaultfd's handshake"},
    {UFFDIO_REGISTER, "UFFDIO_REGISTER",
     "--userfaultfd: register guest memory once the front-end is ready for its faults"},
    {FIONBIO, "FIONBIO", "kj sets O_NONBLOCK this way"},
    {FIOCLEX, "FIOCLEX", "kj sets close-on-exec this way"},
};

// Draft: no clone-net process exists yet.
constexpr SyscallRule kNet[] = {
    {"ioctl", "TAP offload settings (kNetIoctls)"},
    {"accept4", "the core connects to the vhost-user socket"},
};

constexpr IoctlRule kNetIoctls[] = {
    {TUNSETOFFLOAD, "TUNSETOFFLOAD", "offloads the guest negotiated"},
    {TUNSETVNETHDRSZ, "TUNSETVNETHDRSZ", "virtio-net header size"},
    {FIONBIO, "FIONBIO", "kj sets O_NONBLOCK this way"},
    {FIOCLEX, "FIOCLEX", "kj sets close-on-exec this way"},
};

// Draft: no clone-fs process exists yet. A FUSE server needs the file API on its shared dir.
constexpr SyscallRule kFs[] = {
    {"ioctl", "kj only (kFsIoctls)"},
    {"accept4", "the core connects to the vhost-user socket"},
    {"openat", "FUSE OPEN/CREATE/LOOKUP below the shared dir (the jail holds nothing else)"},
    {"openat2", "RESOLVE_BENEATH lookups"},
    {"getdents64", "READDIR"},
    {"statx", "GETATTR"},
    {"readlinkat", "READLINK"},
    {"mkdirat", "MKDIR"},
    {"mknodat", "MKNOD (fifos and sockets only: no CAP_MKNOD)"},
    {"unlinkat", "UNLINK, RMDIR"},
    {"renameat2", "RENAME"},
    {"linkat", "LINK"},
    {"symlinkat", "SYMLINK"},
    {"fchmod", "SETATTR mode"},
    {"fchmodat", "SETATTR mode"},
    {"fchownat", "SETATTR owner"},
    {"fchown", "SETATTR owner"},
    {"utimensat", "SETATTR times"},
    {"ftruncate", "SETATTR size"},
    {"fallocate", "FALLOCATE"},
    {"pread64", "READ"},
    {"pwrite64", "WRITE"},
    {"preadv2", "READ"},
    {"pwritev2", "WRITE"},
    {"fsync", "FSYNC"},
    {"fdatasync", "FSYNC datasync"},
    {"fstatfs", "STATFS"},
    {"flock", "SETLK"},
    {"fgetxattr", "GETXATTR"},
    {"fsetxattr", "SETXATTR"},
    {"flistxattr", "LISTXATTR"},
    {"fremovexattr", "REMOVEXATTR"},
    {"copy_file_range", "COPY_FILE_RANGE"},
};

constexpr IoctlRule kFsIoctls[] = {
    {FIONBIO, "FIONBIO", "kj sets O_NONBLOCK this way"},
    {FIOCLEX, "FIOCLEX", "kj sets close-on-exec this way"},
};

// Draft: no clone-vfio process exists yet.
constexpr SyscallRule kVfio[] = {
    {"ioctl", "VFIO requests (kVfioIoctls)"},
    {"accept4", "the core connects to the control socket"},
    {"pread64", "config space and BAR access through the region fds"},
    {"pwrite64", "as pread64"},
};

constexpr IoctlRule kVfioIoctls[] = {
    {VFIO_DEVICE_GET_INFO, "VFIO_DEVICE_GET_INFO", "regions and irqs of the device"},
    {VFIO_DEVICE_GET_REGION_INFO, "VFIO_DEVICE_GET_REGION_INFO", "BAR sizes and offsets"},
    {VFIO_DEVICE_GET_IRQ_INFO, "VFIO_DEVICE_GET_IRQ_INFO", "MSI-X vector count"},
    {VFIO_DEVICE_SET_IRQS, "VFIO_DEVICE_SET_IRQS", "wire irqfds when the guest enables MSI-X"},
    {VFIO_DEVICE_RESET, "VFIO_DEVICE_RESET", "guest resets the device"},
    {VFIO_IOMMU_MAP_DMA, "VFIO_IOMMU_MAP_DMA", "map guest memory for DMA"},
    {VFIO_IOMMU_UNMAP_DMA, "VFIO_IOMMU_UNMAP_DMA", "unmap it"},
    {FIONBIO, "FIONBIO", "kj sets O_NONBLOCK this way"},
    {FIOCLEX, "FIOCLEX", "kj sets close-on-exec this way"},
};

constexpr Policy kPolicies[] = {
    {Kind::kVmm, true, kVmm, kVmmIoctls},
    {Kind::kBlock, true, kBlock, kBlockIoctls},
    {Kind::kNet, false, kNet, kNetIoctls},
    {Kind::kFs, false, kFs, kFsIoctls},
    {Kind::kVfio, false, kVfio, kVfioIoctls},
};

struct FilterDeleter {
  void operator()(void* ctx) const { seccomp_release(ctx); }
};

int resolve(const char* name) {
  int number = seccomp_syscall_resolve_name(name);
  require(number != __NR_SCMP_ERROR, "seccomp: unknown syscall '{}' in the policy", name);
  return number;
}

void addRule(scmp_filter_ctx ctx, const SyscallRule& rule, std::span<const IoctlRule> ioctls) {
  int number = resolve(rule.name);
  int rc = 0;
  if (std::string_view(rule.name) == "ioctl") {
    for (const auto& ioctl : ioctls) {
      // The request is an unsigned int in the kernel; compare the low 32 bits only.
      rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 1,
                            SCMP_A1(SCMP_CMP_MASKED_EQ, kAll32, ioctl.request & kAll32));
      if (rc < 0) throwSystemError(-rc, "seccomp: allow ioctl", ioctl.name);
    }
    return;
  }
  if (rule.argIndex < 0) {
    rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0);
  } else {
    uint64_t value = rule.argValue == kThisProcess ? static_cast<uint64_t>(::getpid()) : rule.argValue;
    scmp_arg_cmp cmp{static_cast<unsigned>(rule.argIndex), SCMP_CMP_MASKED_EQ, rule.argMask, value};
    rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, &cmp);
  }
  if (rc < 0) throwSystemError(-rc, "seccomp: allow syscall", rule.name);
}

}  // namespace

Kind parseKind(std::string_view name) {
  for (const auto& policy : kPolicies) {
    if (kindName(policy.kind) == name) return policy.kind;
  }
  throw Error(fmt::format("unknown process kind '{}' (vmm, block, net, fs, vfio)", name));
}

Mode parseMode(std::string_view name) {
  if (name == "kill") return Mode::kKill;
  if (name == "log") return Mode::kLog;
  if (name == "off") return Mode::kOff;
  throw Error(fmt::format("unknown seccomp mode '{}' (kill, log, off)", name));
}

std::string_view kindName(Kind kind) {
  switch (kind) {
    case Kind::kVmm: return "vmm";
    case Kind::kBlock: return "block";
    case Kind::kNet: return "net";
    case Kind::kFs: return "fs";
    case Kind::kVfio: return "vfio";
  }
  return "?";
}

std::span<const SyscallRule> commonSyscalls() { return kCommon; }

const Policy& policyFor(Kind kind) {
  for (const auto& policy : kPolicies) {
    if (policy.kind == kind) return policy;
  }
  throw Error("no seccomp policy for this kind");
}

void install(Kind kind, Mode mode) {
  if (mode == Mode::kOff) return;
  // glibc opens /etc/localtime on the first localtime() of the process (spdlog's timestamps),
  // which may come after the lockdown: load it now.
  ::tzset();
  const Policy& policy = policyFor(kind);
  uint32_t violation = mode == Mode::kKill ? SCMP_ACT_KILL_PROCESS : SCMP_ACT_LOG;
  std::unique_ptr<void, FilterDeleter> ctx(seccomp_init(violation));
  require(ctx != nullptr, "seccomp: seccomp_init failed");
  // clone3 passes its flags through memory, which seccomp cannot inspect: make glibc fall back
  // to clone, whose flags rule above allows threads only.
  int rc = seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(ENOSYS), resolve("clone3"), 0);
  if (rc < 0) throwSystemError(-rc, "seccomp: deny syscall", "clone3");
  for (const auto& rule : kCommon) addRule(ctx.get(), rule, policy.ioctls);
  for (const auto& rule : policy.syscalls) addRule(ctx.get(), rule, policy.ioctls);
  rc = seccomp_attr_set(ctx.get(), SCMP_FLTATR_CTL_TSYNC, 1);
  if (rc < 0) throwSystemError(-rc, "seccomp: enable TSYNC");
  if (mode == Mode::kLog) {
    // Allowed calls are not logged, only the ones the policy would have killed.
    rc = seccomp_attr_set(ctx.get(), SCMP_FLTATR_CTL_LOG, 1);
    if (rc < 0) throwSystemError(-rc, "seccomp: enable logging");
  }
  rc = seccomp_load(ctx.get());
  if (rc < 0) throwSystemError(-rc, "seccomp: load the filter", kindName(kind));
}

}  // namespace clonevm::seccomp
