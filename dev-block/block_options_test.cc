// clone-block's command line.

#include "dev-block/block_options.h"

#include <gtest/gtest.h>

namespace clonevm::block {
namespace {

ParsedBlockOptions parse(std::vector<const char*> args) {
  args.insert(args.begin(), "clone-block");
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  auto result = parseBlockOptions(static_cast<int>(args.size()), args.data());
  testing::internal::GetCapturedStderr();
  testing::internal::GetCapturedStdout();
  return result;
}

TEST(BlockOptionsTest, FullCommandLine) {
  auto parsed = parse({"--socket-path", "/run/b.sock", "--image", "d.qcow2", "--format", "qcow2",
                       "--readonly", "--queues", "4", "--serial", "abc", "--control-socket",
                       "/run/c.sock", "--log-level", "debug", "--log-json"});
  ASSERT_TRUE(parsed.options);
  const auto& o = *parsed.options;
  EXPECT_EQ(o.socketPath, "/run/b.sock");
  EXPECT_EQ(o.imagePath, "d.qcow2");
  EXPECT_EQ(o.format, ImageFormat::kQcow2);
  EXPECT_TRUE(o.readOnly);
  EXPECT_EQ(o.queues, 4);
  EXPECT_EQ(o.serial, "abc");
  EXPECT_EQ(o.controlSocket, "/run/c.sock");
  EXPECT_TRUE(o.logJson);
  auto fd = parse({"--fd", "3", "--image", "d.raw"});
  ASSERT_TRUE(fd.options);
  EXPECT_EQ(fd.options->fd, 3);
  EXPECT_EQ(fd.options->format, ImageFormat::kAuto);
}

TEST(BlockOptionsTest, UsageErrorsExitWithTwo) {
  EXPECT_EQ(parse({"--image", "d.raw"}).exitCode, 2) << "neither --socket-path nor --fd";
  EXPECT_EQ(parse({"--socket-path", "s", "--fd", "3", "--image", "d"}).exitCode, 2);
  EXPECT_EQ(parse({"--socket-path", "s"}).exitCode, 2) << "no --image";
  EXPECT_EQ(parse({"--socket-path", "s", "--image", "d", "--format", "vmdk"}).exitCode, 2);
  EXPECT_EQ(parse({"--socket-path", "s", "--image", "d", "--queues", "0"}).exitCode, 2);
  EXPECT_EQ(parse({"--socket-path", "s", "--image", "d", "--serial",
                   "123456789012345678901"}).exitCode, 2);
  EXPECT_FALSE(parse({"--socket-path", "s", "--image", "d", "--bogus"}).options);
  EXPECT_EQ(parse({"--socket-path", "s", "--image", "d", "--seccomp", "lax"}).exitCode, 2);
}

TEST(BlockOptionsTest, OverlayOverMakesAWritableQcow2Image) {
  auto parsed = parse({"--fd", "3", "--image", "o.qcow2", "--overlay-over", "base.raw"});
  ASSERT_TRUE(parsed.options);
  EXPECT_EQ(parsed.options->overlayOver, "base.raw");
  EXPECT_TRUE(parse({"--fd", "3", "--image", "o", "--format", "qcow2", "--overlay-over", "b"}).options);
  EXPECT_EQ(parse({"--fd", "3", "--image", "o", "--format", "raw", "--overlay-over", "b"}).exitCode, 2);
  EXPECT_EQ(parse({"--fd", "3", "--image", "o", "--readonly", "--overlay-over", "b"}).exitCode, 2);
}

TEST(BlockOptionsTest, SeccompDefaultsToKill) {
  EXPECT_EQ(parse({"--socket-path", "s", "--image", "d"}).options->seccomp, "kill");
  EXPECT_EQ(parse({"--socket-path", "s", "--image", "d", "--seccomp", "log"}).options->seccomp,
            "log");
}

TEST(BlockOptionsTest, PrintCapabilitiesNeedsNothingElse) {
  auto parsed = parse({"--print-capabilities"});
  ASSERT_TRUE(parsed.options);
  EXPECT_TRUE(parsed.options->printCapabilities);
  EXPECT_NE(blockCapabilities().find("\"type\": \"block\""), std::string::npos);
}

}  // namespace
}  // namespace clonevm::block
