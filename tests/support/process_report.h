#pragma once
// What a test prints when a VM stopped answering: the processes that serve it and where each
// of their threads waits (state, wait channel and, as root, the kernel stack). A vCPU thread
// asleep in handle_userfault and one halted in kvm_vcpu_block are different bugs.

#include <chrono>
#include <string>
#include <vector>

namespace clonevm::e2e {

// Every process whose command line contains `text` (e.g. a VM's API socket), with its
// threads. "" when there is none.
std::string describeProcessesMatching(const std::string& text);

// Every thread on the host (kernel workers too) whose wait channel is `wchan`, e.g.
// "handle_userfault": a KVM async page fault's worker waits there for a fork's memory fill.
std::string describeThreadsWaitingIn(const std::string& wchan);

// What the vCPU threads ("vcpuN") of the processes whose command line contains `text` do
// in KVM for `window`: L1's kvm tracepoints (exits, page faults, injected exceptions, MMIO),
// counted by event and the first `lines` of them. Needs root and tracefs (the lab has both);
// says why not otherwise. Leaves the tracepoints off.
std::string traceKvmOfProcessesMatching(const std::string& text, std::chrono::milliseconds window,
                                        size_t lines = 40);

// All of the above for a VM whose processes' command lines contain `text` (its API socket):
// its processes, the threads waiting for a memory fill, and 1 s of its vCPUs' KVM events.
std::string describeStuckVm(const std::string& text);

// How the processes whose command line contains `text` map the file at `path` (the file
// itself, by inode: a jailed process may see it under another path), summed over processes and mappings, in KiB. For a copy-on-write
// mapping: shared counts file pages another process maps too (clean or dirty: a file on
// tmpfs is dirty page cache); anonymous, the pages this process wrote (its own copies).
struct FileMappingUsage {
  int mappings = 0;
  uint64_t rss = 0;
  uint64_t shared = 0;
  uint64_t anonymous = 0;
};
FileMappingUsage fileMappingUsage(const std::string& text, const std::string& path);

// The anonymous memory (smaps_rollup "Anonymous:", in KiB) of the processes whose command
// line contains `text`, summed: for a copy-on-write fork, the guest pages it wrote (its own
// copies of the template's pages and the holes it filled) plus the core's heap.
uint64_t anonymousKib(const std::string& text);

// The root directories (/proc/PID/root) of the processes whose command line contains `text`
// and whose root is not the host's: their jails.
std::vector<std::string> jailRootsOfProcessesMatching(const std::string& text);

// The last `lines` lines of the file at `path` ("(PATH: cannot read)" when it cannot be read).
std::string fileTail(const std::string& path, size_t lines = 60);

}  // namespace clonevm::e2e
