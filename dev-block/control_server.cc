#include "dev-block/control_server.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <future>

#include <capnp/rpc-twoparty.h>
#include <kj/async-unix.h>

#include "common/error.h"
#include "device_control.capnp.h"
#include "ipc/capnp/rpc_socket.h"

namespace clonevm::block {

class StartupReport {
 public:
  std::promise<void> promise;
};

namespace {

class DeviceControlImpl final : public rpc::DeviceControl::Server {
 public:
  DeviceControlImpl(const VirtioBlkDevice& device, const std::string& imageDescription)
      : device_(device), imageDescription_(imageDescription) {}

  kj::Promise<void> configure(ConfigureContext) override {
    KJ_FAIL_REQUIRE("clone-block has no runtime configuration (its options are fixed at start)");
  }

  kj::Promise<void> health(HealthContext context) override {
    uint64_t broken = device_.brokenQueueMask();
    auto health = context.getResults().initHealth();
    health.setHealthy(broken == 0);
    std::string detail = fmt::format("{}; {}; front-end {}", imageDescription_,
                                     device_.readOnly() ? "read-only" : "read-write",
                                     device_.frontendConnected() ? "connected" : "not connected");
    for (uint16_t q = 0; q < device_.queueCount(); ++q) {
      if ((broken >> q) & 1) detail += fmt::format("; queue {} is broken", q);
    }
    health.setDetail(detail);
    return kj::READY_NOW;
  }

  kj::Promise<void> stats(StatsContext context) override {
    std::vector<std::pair<std::string, uint64_t>> values;
    uint64_t totals[5] = {};
    for (uint16_t q = 0; q < device_.queueCount(); ++q) {
      const BlkQueueStats& s = device_.stats(q);
      uint64_t queueValues[5] = {s.requests.load(), s.bytesRead.load(), s.bytesWritten.load(),
                                 s.flushes.load(), s.errors.load()};
      static constexpr const char* kNames[5] = {"requests", "bytes_read", "bytes_written",
                                                "flushes", "errors"};
      for (int i = 0; i < 5; ++i) {
        values.emplace_back(fmt::format("queue{}.{}", q, kNames[i]), queueValues[i]);
        totals[i] += queueValues[i];
      }
    }
    values.emplace_back("requests", totals[0]);
    values.emplace_back("bytes_read", totals[1]);
    values.emplace_back("bytes_written", totals[2]);
    values.emplace_back("flushes", totals[3]);
    values.emplace_back("errors", totals[4]);
    auto list = context.getResults().initStats(static_cast<unsigned>(values.size()));
    for (size_t i = 0; i < values.size(); ++i) {
      list[static_cast<unsigned>(i)].setName(values[i].first);
      list[static_cast<unsigned>(i)].setValue(values[i].second);
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> attachVhostUser(AttachVhostUserContext) override {
    KJ_FAIL_REQUIRE("clone-block takes its vhost-user socket from --socket-path or --fd");
  }

 private:
  const VirtioBlkDevice& device_;
  std::string imageDescription_;
};

}  // namespace

BlockControlServer::BlockControlServer(const VirtioBlkDevice& device,
                                       std::string imageDescription, spdlog::logger& log)
    : device_(device), imageDescription_(std::move(imageDescription)), log_(log) {
  stopFd_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                   "create the control server's stop eventfd"));
}

BlockControlServer::~BlockControlServer() { stop(); }

void BlockControlServer::start(const std::string& socketPath) {
  require(!thread_.joinable(), "the control server is already running");
  StartupReport report;
  auto started = report.promise.get_future();
  thread_ = std::thread([this, socketPath, &report] { serve(socketPath, report); });
  try {
    started.get();
  } catch (...) {
    thread_.join();
    throw;
  }
}

void BlockControlServer::serve(const std::string& socketPath, StartupReport& report) {
  try {
    auto io = kj::setupAsyncIo();
    kj::Own<kj::ConnectionReceiver> listener;
    try {
      listener = rpc::listenUnix(io, socketPath);
    } catch (...) {
      report.promise.set_exception(std::current_exception());
      return;
    }
    capnp::TwoPartyServer server(kj::heap<DeviceControlImpl>(device_, imageDescription_));
    auto serving = server.listen(*listener).eagerlyEvaluate([this](kj::Exception&& e) {
      log_.error("control socket: {}", rpc::describeKjException(e));
    });
    log_.info("DeviceControl API listening on {}", socketPath);
    report.promise.set_value();
    kj::UnixEventPort::FdObserver stopObserver(io.unixEventPort, stopFd_.get(),
                                               kj::UnixEventPort::FdObserver::OBSERVE_READ);
    stopObserver.whenBecomesReadable().wait(io.waitScope);
    ::unlink(socketPath.c_str());
  } catch (const kj::Exception& e) {
    log_.error("control socket: {}", rpc::describeKjException(e));
  } catch (const std::exception& e) {
    log_.error("control socket: {}", e.what());
  }
}

void BlockControlServer::stop() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  ssize_t n = ::write(stopFd_.get(), &one, sizeof(one));
  (void)n;
  thread_.join();
}

}  // namespace clonevm::block
