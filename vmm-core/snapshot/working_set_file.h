#pragma once
// A template's `workingset` file (docs/FORK.md): the 4 KiB pages its first fork touched in its
// first second, and which of those it wrote. Later forks prefetch the pages; a fork server's
// spare copies the written ones ahead. The core writes it when it can (an unjailed fork);
// `clone fork` writes it for a jailed fork, from the list the fork's API returns. Both go
// through this file.
//
// Format: magic "CLWSET02", granularity (u64), count (u64), then `count` offsets (u64) of that
// granularity; bit 0 of an offset marks a written page. "CLWSET01" files (no written marks)
// and sets recorded in 64 KiB chunks by older builds are still read.

#include <cstdint>
#include <string>
#include <vector>

namespace clonevm::vmm::snapshot {

struct WorkingSet {
  std::vector<uint64_t> pages;    // byte offsets into guest memory, 4 KiB aligned, sorted
  std::vector<uint64_t> written;  // of those, the pages the fork wrote, sorted
};

// Reads `path`. A missing file gives an empty set; an unusable one throws clonevm::Error with
// the reason (callers ignore it and go on without). Entries outside `memorySize` are dropped.
WorkingSet readWorkingSetFile(const std::string& path, uint64_t memorySize);

// For a set from an untrusted source (a fork's API): offsets aligned, inside `memorySize`,
// strictly increasing, written pages among the pages. Throws clonevm::Error naming the first
// problem.
void checkWorkingSet(const WorkingSet& set, uint64_t memorySize);

// Puts `set` in place as `workingset` in the directory `dirFd` (AT_FDCWD: `dir` is its path;
// otherwise `dir` names it in messages): written, 0444, under a private name that `writer`
// makes unique within this process, then linked into place, so readers never see a partial
// file and a file already there is never replaced. Returns false when one was there. Throws
// clonevm::Error when the directory cannot be written to.
bool linkWorkingSetFile(int dirFd, const std::string& dir, const WorkingSet& set,
                        const std::string& writer);

}  // namespace clonevm::vmm::snapshot
