#pragma once
// Logging for every Clone process: spdlog to stderr, as text or as one JSON object a line.
// A logger is made in main() and handed to whoever logs; there is no global logger.

#include <memory>
#include <string>
#include <string_view>

#include <spdlog/spdlog.h>

namespace clonevm {

enum class LogFormat { kText, kJson };

struct LogOptions {
  spdlog::level::level_enum level = spdlog::level::info;
  LogFormat format = LogFormat::kText;
};

// Parses "trace|debug|info|warn|error|off"; throws clonevm::Error on anything else.
spdlog::level::level_enum parseLogLevel(std::string_view text);

// A logger named `component` ("vmm", "block", ...) that writes to stderr.
std::shared_ptr<spdlog::logger> makeLogger(std::string component, const LogOptions& options);

// A logger that writes to `sink` instead of stderr (tests).
std::shared_ptr<spdlog::logger> makeLogger(std::string component, const LogOptions& options,
                                           spdlog::sink_ptr sink);

// Escapes `text` for use inside a JSON string literal.
std::string jsonEscape(std::string_view text);

}  // namespace clonevm
