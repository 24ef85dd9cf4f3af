#include "tests/support/process_report.h"

#include <algorithm>
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

}  // namespace

std::string describeProcessesMatching(const std::string& text) {
  std::string report;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    const std::string name = entry.path().filename();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    std::string cmdline = oneLine(readWhole(entry.path() / "cmdline"));
    if (cmdline.find(text) == std::string::npos) continue;
    report += fmt::format("process {}: {}\n", name, cmdline);
    std::error_code taskError;
    for (const auto& task : std::filesystem::directory_iterator(entry.path() / "task", taskError)) {
      std::string stack = readWhole(task.path() / "stack");
      report += fmt::format("  thread {} {} wchan={}\n", task.path().filename().string(),
                            threadState(task.path()), oneLine(readWhole(task.path() / "wchan")));
      std::istringstream frames(stack);
      for (std::string frame; std::getline(frames, frame);) report += "    " + frame + "\n";
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
