// The DeviceControl API of clone-block, queried over its unix socket by a Cap'n Proto client.

#include "dev-block/control_server.h"

#include <unistd.h>

#include <capnp/rpc-twoparty.h>
#include <gtest/gtest.h>
#include <kj/async-io.h>
#include <spdlog/sinks/null_sink.h>

#include "dev-block/test_block.h"
#include "device_control.capnp.h"
#include "ipc/capnp/rpc_socket.h"

namespace clonevm::block {
namespace {

TEST(BlockControlServerTest, HealthAndStatsOverTheSocket) {
  testing::FakeImage image(1 << 20);
  auto log = std::make_shared<spdlog::logger>("t", std::make_shared<spdlog::sinks::null_sink_mt>());
  BlkDeviceOptions options;
  options.queues = 2;
  VirtioBlkDevice device(image, options, *log);
  std::string path = fmt::format("{}/block-control-{}.sock", ::testing::TempDir(), ::getpid());
  BlockControlServer server(device, "test.img (fake)", *log);
  server.start(path);

  auto io = kj::setupAsyncIo();
  auto stream = rpc::connectUnix(io, path);
  capnp::TwoPartyClient client(*stream);
  auto control = client.bootstrap().castAs<rpc::DeviceControl>();

  auto health = control.healthRequest().send().wait(io.waitScope).getHealth();
  EXPECT_TRUE(health.getHealthy());
  std::string detail = health.getDetail();
  EXPECT_NE(detail.find("test.img (fake)"), std::string::npos) << detail;
  EXPECT_NE(detail.find("front-end not connected"), std::string::npos) << detail;

  auto stats = control.statsRequest().send().wait(io.waitScope).getStats();
  std::map<std::string, uint64_t> byName;
  for (auto stat : stats) byName[stat.getName()] = stat.getValue();
  EXPECT_EQ(byName.size(), 2u * 5 + 5);
  for (const char* name : {"queue0.requests", "queue1.bytes_written", "queue1.errors",
                           "requests", "bytes_read", "flushes", "errors"}) {
    EXPECT_EQ(byName.count(name), 1u) << name;
  }

  // No runtime configuration and no fd passing: refused with a reason, the server lives on.
  auto configure = control.configureRequest();
  configure.setConfig("{}");
  EXPECT_THROW(configure.send().wait(io.waitScope), kj::Exception);
  EXPECT_TRUE(control.healthRequest().send().wait(io.waitScope).getHealth().getHealthy());

  server.stop();
  EXPECT_NE(::access(path.c_str(), F_OK), 0) << "the socket is removed";
}

TEST(BlockControlServerTest, ASocketInUseFailsTheStart) {
  testing::FakeImage image(1 << 20);
  auto log = std::make_shared<spdlog::logger>("t", std::make_shared<spdlog::sinks::null_sink_mt>());
  VirtioBlkDevice device(image, {}, *log);
  std::string path = fmt::format("{}/block-control-busy-{}.sock", ::testing::TempDir(), ::getpid());
  BlockControlServer first(device, "a", *log);
  first.start(path);
  BlockControlServer second(device, "b", *log);
  EXPECT_THROW(second.start(path), Error);
}

}  // namespace
}  // namespace clonevm::block
