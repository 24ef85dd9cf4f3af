#include "cli/app.h"

#include <sstream>

#include <gtest/gtest.h>

#include "clone/version.h"

namespace clonevm::cli {
namespace {

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result run(std::vector<std::string> args) {
  args.insert(args.begin(), "clone");
  std::ostringstream out, err;
  int code = runApp(args, {out, err});
  return {code, out.str(), err.str()};
}

TEST(CliTest, VersionPrintsVersion) {
  auto result = run({"version"});
  EXPECT_EQ(result.code, 0);
  EXPECT_EQ(result.out, std::string("clone ") + kVersion + "\n");
}

TEST(CliTest, HelpListsVerbs) {
  auto result = run({"--help"});
  EXPECT_EQ(result.code, 0);
  EXPECT_NE(result.out.find("version"), std::string::npos) << result.out;
}

TEST(CliTest, UnknownVerbFails) {
  auto result = run({"frobnicate"});
  EXPECT_NE(result.code, 0);
  EXPECT_NE(result.err.find("frobnicate"), std::string::npos) << result.err;
}

TEST(CliTest, MissingVerbFails) {
  auto result = run({});
  EXPECT_NE(result.code, 0);
}

}  // namespace
}  // namespace clonevm::cli
