#include "tests/support/process_report.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <vector>

#include <fmt/format.h>

namespace clonevm::e2e {
namespace {

std::string readWhole(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string oneLine(std::string text) {
  std::replace(text.begin(), text.end(), '\0', ' ');
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

// "comm (state)" from /proc/PID/task/TID/stat: the state follows the parenthesised name.
std::string threadState(const std::filesystem::path& task) {
  std::string stat = readWhole(task / "stat");
  auto close = stat.rfind(')');
  auto open = stat.find('(');
  if (open == std::string::npos || close == std::string::npos || close + 2 >= stat.size()) return "?";
  return fmt::format("{} {}", stat.substr(open + 1, close - open - 1), stat[close + 2]);
}

bool isPid(const std::filesystem::path& path) {
  const std::string name = path.filename();
  return !name.empty() && std::all_of(name.begin(), name.end(), ::isdigit);
}

std::string describeThread(const std::filesystem::path& task) {
  std::string report = fmt::format("  thread {} {} wchan={}\n", task.filename().string(),
                                   threadState(task), oneLine(readWhole(task / "wchan")));
  std::istringstream frames(readWhole(task / "stack"));
  for (std::string frame; std::getline(frames, frame);) report += "    " + frame + "\n";
  return report;
}

}  // namespace

std::string describeProcessesMatching(const std::string& text) {
  std::string report;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    if (!isPid(entry.path())) continue;
    std::string cmdline = oneLine(readWhole(entry.path() / "cmdline"));
    if (cmdline.find(text) == std::string::npos) continue;
    report += fmt::format("process {}: {}\n", entry.path().filename().string(), cmdline);
    std::error_code taskError;
    for (const auto& task : std::filesystem::directory_iterator(entry.path() / "task", taskError)) {
      report += describeThread(task.path());
    }
  }
  return report;
}

std::string describeThreadsWaitingIn(const std::string& wchan) {
  std::string report;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    if (!isPid(entry.path())) continue;
    std::error_code taskError;
    for (const auto& task : std::filesystem::directory_iterator(entry.path() / "task", taskError)) {
      if (oneLine(readWhole(task.path() / "wchan")) != wchan) continue;
      report += fmt::format("process {} ({}):\n", entry.path().filename().string(),
                            oneLine(readWhole(entry.path() / "cmdline")));
      report += describeThread(task.path());
    }
  }
  return report;
}

std::string fileTail(const std::string& path, size_t lines) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fmt::format("({}: cannot read)\n", path);
  std::vector<std::string> all;
  for (std::string line; std::getline(in, line);) all.push_back(line);
  std::string tail;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    tail += all[i] + "\n";
  }
  return tail;
}

}  // namespace clonevm::e2e
