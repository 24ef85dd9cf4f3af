#include "common/log.h"

#include <spdlog/sinks/ostream_sink.h>

#include <sstream>

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm {
namespace {

TEST(LogTest, JsonFormatEscapesMessage) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  auto logger = makeLogger("vmm", {spdlog::level::info, LogFormat::kJson}, sink);
  logger->info("quote \" backslash \\ newline \n end");
  std::string line = out.str();
  EXPECT_NE(line.find(R"("component":"vmm")"), std::string::npos) << line;
  EXPECT_NE(line.find(R"("level":"info")"), std::string::npos) << line;
  EXPECT_NE(line.find(R"("msg":"quote \" backslash \\ newline \n end")"), std::string::npos)
      << line;
  EXPECT_EQ(line.front(), '{');
  EXPECT_EQ(line.substr(line.size() - 2), "}\n");
}

TEST(LogTest, LevelFiltersMessages) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  auto logger = makeLogger("block", {spdlog::level::warn, LogFormat::kText}, sink);
  logger->info("hidden");
  logger->warn("shown");
  EXPECT_EQ(out.str().find("hidden"), std::string::npos);
  EXPECT_NE(out.str().find("shown"), std::string::npos);
}

TEST(LogTest, ParseLogLevel) {
  EXPECT_EQ(parseLogLevel("debug"), spdlog::level::debug);
  EXPECT_EQ(parseLogLevel("error"), spdlog::level::err);
  EXPECT_EQ(parseLogLevel("warn"), spdlog::level::warn);
  EXPECT_EQ(parseLogLevel("warning"), spdlog::level::warn);
  EXPECT_THROW(parseLogLevel("loud"), Error);
}

TEST(LogTest, JsonEscapeControlCharacters) {
  EXPECT_EQ(jsonEscape(std::string_view("a\x01z", 3)), "a\\u0001z");
}

}  // namespace
}  // namespace clonevm
