#include "vmm-core/api/vm_api_server.h"

#include <unistd.h>

#include <optional>

#include <capnp/rpc-twoparty.h>
#include <kj/async-unix.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "ipc/capnp/rpc_socket.h"
#include "vm_control.capnp.h"

namespace clonevm::vmm {
namespace {

class VmControlServer final : public rpc::VmControl::Server {
 public:
  VmControlServer(Machine& machine, spdlog::logger& log, bool& stoppedByApi, kj::Timer& timer)
      : machine_(machine), log_(log), stoppedByApi_(stoppedByApi), timer_(timer) {}

  kj::Promise<void> status(StatusContext context) override {
    auto status = context.getResults().initStatus();
    if (machine_.exitSignal().requested()) {
      status.setState(rpc::VmState::STOPPING);
    } else {
      status.setState(machine_.paused() ? rpc::VmState::PAUSED : rpc::VmState::RUNNING);
    }
    status.setVcpus(machine_.config().vcpuCount);
    status.setMemoryMib(machine_.config().memoryBytes >> 20);
    status.setUptimeMs(static_cast<uint64_t>(machine_.uptimeMillis()));
    status.setPid(static_cast<uint32_t>(::getpid()));
    status.setKernel(machine_.config().kernelPath);
    if (auto* vsock = machine_.vsock()) status.setVsockCid(static_cast<uint32_t>(vsock->guestCid()));
    status.setVhostUserDevices(static_cast<uint32_t>(machine_.vhostUserBackends().size()));
    auto fill = status.initMemoryFill();
    fill.setRestored(machine_.restored());
    auto stats = machine_.memoryFillStats();
    fill.setFaults(stats.faults);
    fill.setDeviceFaults(stats.deviceFaults);
    fill.setCopiedPages(stats.copiedPages);
    fill.setZeroedPages(stats.zeroedPages);
    fill.setPrefetchedPages(stats.prefetchedPages);
    fill.setCopyOnWrite(machine_.copyOnWriteMemory());
    return kj::READY_NOW;
  }

  kj::Promise<void> pause(PauseContext) override {
    log_.info("API: pause");
    machine_.pause();
    return kj::READY_NOW;
  }

  kj::Promise<void> resume(ResumeContext) override {
    log_.info("API: resume");
    machine_.resume();
    return kj::READY_NOW;
  }

  kj::Promise<void> shutdown(ShutdownContext context) override {
    if (context.getParams().getGraceful()) {
      log_.info("API: shutdown (ACPI power button)");
      machine_.pressPowerButton();
    } else {
      log_.info("API: shutdown (stop now)");
      stoppedByApi_ = true;
      machine_.requestExit(ExitReason::kPowerOff, "stopped through the API");
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> snapshot(SnapshotContext context) override {
    auto params = context.getParams();
    SnapshotOptions options;
    options.outputDir = params.getOutputDir();
    options.leavePaused = params.getLeavePaused();
    auto directory = params.getDirectory();
    // The directory's fd arrives with the call; it stays open while `directory` lives.
    return directory.getFd().then(
        [this, context, options, directory](kj::Maybe<int> fd) mutable {
          KJ_IF_MAYBE(dirFd, fd) { options.outputDirFd = *dirFd; }
          log_.info("API: snapshot to {}", options.outputDir);
          // Errors (no directory, a virtio-fs share) go back to the caller as the call's
          // exception.
          SnapshotResult done;
          try {
            require(options.outputDirFd >= 0,
                    "snapshot to {}: the call carried no open directory (the client must pass "
                    "one; `clone snapshot` does)", options.outputDir);
            done = machine_.snapshot(options);
          } catch (const std::exception& e) {
            log_.error("snapshot to {} failed: {}", options.outputDir, e.what());
            kj::throwFatalException(KJ_EXCEPTION(FAILED, e.what()));
          }
          auto result = context.getResults().initResult();
          result.setMemoryDataBytes(done.memoryDataBytes);
          result.setStateBytes(done.stateBytes);
          result.setPausedMs(done.pausedMillis);
        });
  }

  kj::Promise<void> recordedWorkingSet(RecordedWorkingSetContext context) override {
    // Asking ends the window: the caller has had the fork do what later forks will.
    machine_.endWorkingSetWindow();
    return whenWorkingSetRecorded(timer_.now() + kWorkingSetWait).then([this, context]() mutable {
      auto set = machine_.recordedWorkingSet();
      if (!set) {
        const char* reason = machine_.recordingWorkingSet()
            ? "this fork's working-set record has not ended yet"
            : "this fork recorded no working set (its template had one, it was not restored, or "
              "the record failed)";
        log_.warn("API: recorded working set: {}", reason);
        kj::throwFatalException(KJ_EXCEPTION(FAILED, reason));
      }
      log_.info("API: recorded working set ({} pages, {} written)", set->pages.size(),
                set->written.size());
      auto results = context.getResults();
      auto pages = results.initPages(static_cast<unsigned>(set->pages.size()));
      for (unsigned i = 0; i < pages.size(); ++i) pages.set(i, set->pages[i]);
      auto written = results.initWrittenPages(static_cast<unsigned>(set->written.size()));
      for (unsigned i = 0; i < written.size(); ++i) written.set(i, set->written[i]);
    });
  }

 private:
  // Once its window is ended, a record takes one read of the page table (or the fill's list).
  static constexpr kj::Duration kWorkingSetWait = 10 * kj::SECONDS;

  kj::Promise<void> whenWorkingSetRecorded(kj::TimePoint deadline) {
    if (!machine_.recordingWorkingSet() || timer_.now() >= deadline) {
      return kj::READY_NOW;
    }
    return timer_.afterDelay(20 * kj::MILLISECONDS).then([this, deadline] {
      return whenWorkingSetRecorded(deadline);
    });
  }

  Machine& machine_;
  spdlog::logger& log_;
  bool& stoppedByApi_;
  kj::Timer& timer_;
};

// How long the loop keeps running after an API shutdown, so that the caller gets its reply.
constexpr auto kReplyGrace = 200 * kj::MILLISECONDS;

}  // namespace

ExitReason runWithApi(Machine& machine, const ApiEndpoint& endpoint, spdlog::logger& log,
                      kj::AsyncIoContext* callersIo) {
  std::optional<kj::AsyncIoContext> ownIo;
  if (callersIo == nullptr) ownIo.emplace(kj::setupAsyncIo());
  kj::AsyncIoContext& io = callersIo != nullptr ? *callersIo : *ownIo;
  bool inherited = endpoint.inheritedFd >= 0;
  auto listener = inherited
      ? rpc::listenOnFd(io, UniqueFd(endpoint.inheritedFd), "--api-fd " + endpoint.path)
      : rpc::listenUnix(io, endpoint.path);
  bool stoppedByApi = false;
  capnp::TwoPartyServer server(kj::heap<VmControlServer>(machine, log, stoppedByApi, io.provider->getTimer()));
  auto serving = server.listenCapStreamReceiver(*listener, rpc::kMaxFdsPerMessage)
                     .eagerlyEvaluate([&log](kj::Exception&& e) {
                       log.error("API socket: {}", rpc::describeKjException(e));
                     });
  log.info("API listening on {}{}", endpoint.path, inherited ? " (inherited socket)" : "");
  machine.start();
  kj::UnixEventPort::FdObserver exitObserver(io.unixEventPort, machine.exitSignal().eventFd(),
                                             kj::UnixEventPort::FdObserver::OBSERVE_READ);
  exitObserver.whenBecomesReadable().wait(io.waitScope);
  if (stoppedByApi) {
    // The shutdown call's reply is written by this loop; leaving at once would drop it.
    io.provider->getTimer().afterDelay(kReplyGrace).wait(io.waitScope);
  }
  ExitReason reason = machine.finish();
  if (!inherited) ::unlink(endpoint.path.c_str());
  return reason;
}

}  // namespace clonevm::vmm
