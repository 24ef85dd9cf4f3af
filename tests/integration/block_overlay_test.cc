// clone-block --overlay-over: the process makes its own overlay before it serves it (a fork
// server's spare starts its disks this way, inside its jail), and never overwrites an image.

#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "dev-block/image/block_image.h"
#include "tests/support/guest_session.h"
#include "tests/support/socket_daemon.h"

namespace clonevm::block {
namespace {

namespace fs = std::filesystem;

TEST(BlockOverlayTest, CloneBlockCreatesItsOverlayAndRefusesOneThatExists) {
  fs::path dir = e2e::freshScratchDir("integration-block/overlay");
  fs::path base = dir / "base.raw";
  fs::path overlay = dir / "fork.qcow2";
  {
    std::ofstream out(base, std::ios::binary);
    std::string block(4096, 'b');
    for (int i = 0; i < 256; ++i) out << block;
  }
  std::string socket = fmt::format("/tmp/clone-block-overlay-{}.sock", ::getpid());
  {
    e2e::SocketDaemon process(e2e::buildBin("clone-block"),
                              {"--socket-path", socket, "--image", overlay.string(), "--overlay-over",
                               base.string()},
                              dir / "first.log", socket);
    ASSERT_TRUE(process.waitReady()) << process.log();
    EXPECT_NE(process.log().find("created " + overlay.string() + " as an overlay over"), std::string::npos)
        << process.log();
    auto image = openImage({overlay.string(), ImageFormat::kAuto, true});
    EXPECT_EQ(image->virtualSize(), 1u << 20);
    EXPECT_NE(image->describe().find("qcow2"), std::string::npos) << image->describe();
    EXPECT_EQ(imageChainPaths(overlay.string(), ImageFormat::kAuto).size(), 2u);
    EXPECT_EQ(process.stop(SIGTERM), 0);
  }
  auto sizeBefore = fs::file_size(overlay);
  fs::remove(socket);  // so that only a second process that listens makes it again
  {
    e2e::SocketDaemon again(e2e::buildBin("clone-block"),
                            {"--socket-path", socket, "--image", overlay.string(), "--overlay-over",
                             base.string()},
                            dir / "second.log", socket);
    EXPECT_FALSE(again.waitReady(std::chrono::seconds(10))) << again.log();
    EXPECT_NE(again.log().find("File exists"), std::string::npos) << again.log();
  }
  EXPECT_EQ(fs::file_size(overlay), sizeBefore);
  fs::remove(socket);
}

}  // namespace
}  // namespace clonevm::block
