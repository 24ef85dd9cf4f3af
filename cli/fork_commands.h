#pragma once
// `clone snapshot|fork|list|destroy`: templates and forks (docs/FORK.md).

#include <chrono>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/agent_client.h"
#include "cli/app.h"
#include "cli/process_launcher.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::cli {

struct ForkCommandOptions {
  std::string socket;         // snapshot, destroy: --vm
  std::string output;         // snapshot: --output
  bool leavePaused = false;   // snapshot
  std::string templateDir;    // fork: --template
  unsigned count = 1;         // fork
  std::string apiSocket;      // fork: explicit socket (PATH, or PATH.N for N > 1 forks)
  bool noIdentity = false;    // fork: --no-identity (do not talk to the guest agent)
  bool noJail = false;        // fork: --no-jail
  std::vector<std::string> disks;  // fork: --disk N,overlay=PATH
  bool diskFillUpFront = false;    // fork: --disk-fill-up-front (no vhost-user postcopy, docs/FORK.md)
  std::string forkMemory = "memfd";  // fork: --fork-memory memfd|cow
  bool forkServer = false;           // fork: --fork-server (a jailed core that forks them)
  double forkServerLinger = 60;      // fork: --fork-server-linger (for a server it starts)
  unsigned forkServerMaxForks = 64;  // fork: --fork-server-max-forks (for a server it starts)
};

// Where forks' API sockets and console logs live: $CLONE_RUNTIME_DIR, else
// $XDG_RUNTIME_DIR/clone, else /tmp/clone-UID. Created on demand (0700).
std::string runtimeDir();

// The identity a fork gets (DESIGN §6): its id as hostname, a fresh 32-byte RNG seed from
// the host's getrandom(), the host's wall clock now.
Identity forkIdentity(const std::string& forkId);

// How far the guest's clock read back after IDENTITY may be from the host's.
inline constexpr std::chrono::milliseconds kGuestClockTolerance{2000};

// Checks what the guest read back after IDENTITY against what was sent; `hostNow` is the host's
// wall clock when the answer arrived. Returns one line per problem (none: applied as asked).
std::vector<std::string> identityProblems(const Identity& sent, const IdentityResult& result,
                                          std::chrono::system_clock::time_point hostNow,
                                          std::chrono::milliseconds clockTolerance = kGuestClockTolerance);

// A jailed fork cannot write into its template: `clone fork`, the template's owner, fetches
// the working set the fork at `socket` recorded (the VM API's recordedWorkingSet), checks it
// as untrusted input (vmm-core/snapshot/working_set_file.h) and writes `workingset` into
// `templateDir`. Never throws: a failure is a warning on `err` (later forks start slower).
void saveTemplateWorkingSet(const std::string& templateDir, uint64_t memorySize,
                            const std::string& forkId, const std::string& socket, std::ostream& err);

// What a fork's core needs from its jail: the template (read-only), its API socket as the
// inherited listening `apiFd` (nothing writable), /dev/kvm, /dev/userfaultfd (a memfd fork's memory is filled lazily; the jail has no
// CAP_SYS_PTRACE for the userfaultfd syscall; a copy-on-write fork has no fill) and
// /dev/vhost-vsock when the template has vsock.
ProcessSpec forkProcessSpec(const std::string& forkId, const std::string& templateDir,
                            const vmm::snapshot::Manifest& manifest, const std::string& socket,
                            const std::string& consoleLog, const std::string& program,
                            bool copyOnWriteMemory, int apiFd);

// Where the fork server of one template (the very files verified: their inode and ctime) and
// one way of forking lives in the runtime directory; "" + .forkserver and .console.
std::string forkServerBase(const std::string& runtime, const std::string& templateDir,
                           const vmm::snapshot::FileIdentity& memoryFile, const std::string& forkMemory,
                           bool jailed, bool disksFilledUpFront = false);

// Fork servers that ended leave their socket and overlay directory in `runtime` (nothing in
// their jail may remove them). Removes every `fork-server-*.forkserver` socket nobody listens
// on whose file is at least `minAge` old (younger ones may be a starting server's, bound but
// not listening yet), and its overlay directory if empty. Logs stay, to be read.
void removeEndedForkServers(const std::string& runtime, std::chrono::seconds minAge);

// A template with disks: the server's spares start each fork's clone-blocks in this jail
// (vmm-core/api/spare_disks.h), so it also holds `blockProgram` and, writable, `overlayDir`,
// where those make the disks' overlays; a fork's are moved out of it when it starts.
struct ForkServerDisks {
  std::string blockProgram;
  std::string overlayDir;
  bool fillUpFront = false;  // the spares' disks without postcopy
};

// The jail of a fork server (clone-vmm --fork-server-fd, docs/FORK.md): a fork's jail, with the
// server's listening socket `serverFd` instead of an API socket, and room for `forks` VMs and
// processes.
ProcessSpec forkServerProcessSpec(const std::string& serverId, const std::string& templateDir,
                                  const vmm::snapshot::Manifest& manifest,
                                  const std::string& consoleLog, const std::string& program,
                                  bool copyOnWriteMemory, int serverFd, unsigned forks,
                                  const ForkServerDisks& disks = {});

// `jailed` starts forks' cores unless --no-jail; wired in main (app.cc).
void addForkCommands(CLI::App& app, ForkCommandOptions& options, Streams streams,
                     ProcessLauncher& jailed);

}  // namespace clonevm::cli
