#include "cli/vm_commands.h"

#include <capnp/rpc-twoparty.h>
#include <fmt/format.h>

#include "cli/vm_client.h"

namespace clonevm::cli {

const char* stateName(rpc::VmState state) {
  switch (state) {
    case rpc::VmState::RUNNING: return "running";
    case rpc::VmState::PAUSED: return "paused";
    case rpc::VmState::STOPPING: return "stopping";
  }
  return "unknown";
}

namespace {

void printStatus(const rpc::VmStatus::Reader& status, bool json, std::ostream& out) {
  auto fill = status.getMemoryFill();
  if (json) {
    std::string memoryFill = "null";
    if (fill.getRestored()) {
      memoryFill = fmt::format(
          R"({{"faults":{},"device_faults":{},"copied_pages":{},"zeroed_pages":{},"prefetched_pages":{},"memory":"{}"}})",
          fill.getFaults(), fill.getDeviceFaults(), fill.getCopiedPages(), fill.getZeroedPages(),
          fill.getPrefetchedPages(), fill.getCopyOnWrite() ? "cow" : "memfd");
    }
    out << fmt::format(
        R"({{"state":"{}","vcpus":{},"memory_mib":{},"uptime_ms":{},"pid":{},"kernel":"{}","vsock_cid":{},"memory_fill":{}}})"
        "\n",
        stateName(status.getState()), status.getVcpus(), status.getMemoryMib(),
        status.getUptimeMs(), status.getPid(), status.getKernel().cStr(), status.getVsockCid(),
        memoryFill);
    return;
  }
  out << fmt::format("state: {}\nvcpus: {}\nmemory: {} MiB\nuptime: {:.1f} s\npid: {}\nkernel: {}\n",
                     stateName(status.getState()), status.getVcpus(), status.getMemoryMib(),
                     status.getUptimeMs() / 1000.0, status.getPid(), status.getKernel().cStr());
  if (status.getVsockCid() != 0) out << fmt::format("vsock cid: {}\n", status.getVsockCid());
  if (fill.getRestored() && fill.getCopyOnWrite()) {
    out << fmt::format("memory: a copy-on-write mapping of the template ({} KiB prefetched)\n",
                       fill.getPrefetchedPages() * 4);
  } else if (fill.getRestored()) {
    uint64_t filled = fill.getCopiedPages() + fill.getZeroedPages();
    out << fmt::format("memory filled from the template: {} KiB ({} KiB prefetched), {} faults "
                       "({} from devices)\n",
                       filled * 4, fill.getPrefetchedPages() * 4, fill.getFaults(),
                       fill.getDeviceFaults());
  }
}

CLI::App* addVerb(CLI::App& app, const std::string& name, const std::string& help,
                  VmCommandOptions& options) {
  auto* verb = app.add_subcommand(name, help);
  verb->add_option("--vm", options.socket, "the VM's API socket (clone run --api-socket)")
      ->required();
  return verb;
}

}  // namespace

uint32_t vmVsockCid(const std::string& socket) {
  uint32_t cid = 0;
  withVm(socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
    cid = vm.statusRequest().send().wait(waitScope).getStatus().getVsockCid();
  });
  return cid;
}

void addVmCommands(CLI::App& app, VmCommandOptions& options, Streams streams) {
  auto* status = addVerb(app, "status", "show a running VM's state", options);
  status->add_flag("--json", options.json, "print one JSON object");
  status->callback([&options, streams] {
    withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
      auto response = vm.statusRequest().send().wait(waitScope);
      printStatus(response.getStatus(), options.json, streams.out);
    });
  });

  addVerb(app, "pause", "stop a VM's vCPUs (its memory and devices stay)", options)
      ->callback([&options, streams] {
        withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
          vm.pauseRequest().send().wait(waitScope);
        });
        streams.out << "paused\n";
      });

  addVerb(app, "resume", "let a paused VM run again", options)->callback([&options, streams] {
    withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
      vm.resumeRequest().send().wait(waitScope);
    });
    streams.out << "resumed\n";
  });

  auto* shutdown = addVerb(app, "shutdown", "end a VM now (or ask the guest, with --graceful)", options);
  shutdown->add_flag("--graceful", options.graceful,
                     "press the ACPI power button and let the guest power off");
  shutdown->callback([&options, streams] {
    withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
      auto request = vm.shutdownRequest();
      request.setGraceful(options.graceful);
      request.send().wait(waitScope);
    });
    streams.out << (options.graceful ? "power button pressed\n" : "stopped\n");
  });
}

}  // namespace clonevm::cli
