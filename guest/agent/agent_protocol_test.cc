// The agent's wire format: round trips, and malformed frames rejected with a status (never
// read past the payload: the decoders get exact-size heap copies, so ASan builds catch any
// overrun).
#include "agent_protocol.h"

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace {

std::vector<uint8_t> encodeExec(std::vector<std::string> args, std::vector<std::string> env,
                                bool hasEnv) {
  std::vector<const char*> argv, envv;
  for (auto& a : args) argv.push_back(a.c_str());
  for (auto& e : env) envv.push_back(e.c_str());
  std::vector<uint8_t> out(CA_MAX_PAYLOAD);
  long n = ca_encode_exec(out.data(), out.size(), argv.data(), static_cast<uint32_t>(argv.size()),
                          envv.data(), static_cast<uint32_t>(envv.size()), hasEnv);
  EXPECT_GE(n, 0) << ca_status_text(static_cast<int>(n));
  out.resize(n < 0 ? 0 : n);
  return out;
}

int decodeExec(const std::vector<uint8_t>& bytes, ca_exec* exec) {
  // An exact-size allocation: reading one byte past it is a heap overflow under ASan.
  auto* copy = static_cast<uint8_t*>(std::malloc(bytes.size() ? bytes.size() : 1));
  if (!bytes.empty()) std::memcpy(copy, bytes.data(), bytes.size());
  int status = ca_decode_exec(copy, bytes.size(), exec);
  std::free(copy);
  return status;
}

void putU32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

TEST(AgentProtocol, HeaderRoundTripAndLimits) {
  uint8_t raw[CA_HEADER_SIZE];
  ca_header h;
  ca_encode_header(raw, CA_STDOUT, 1234);
  ASSERT_EQ(ca_decode_header(raw, &h), CA_OK);
  EXPECT_EQ(h.version, CA_VERSION);
  EXPECT_EQ(h.type, CA_STDOUT);
  EXPECT_EQ(h.length, 1234u);

  ca_encode_header(raw, CA_STDOUT, CA_MAX_PAYLOAD + 1);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_LENGTH);
  ca_encode_header(raw, 0, 0);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_TYPE);
  ca_encode_header(raw, 99, 0);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_TYPE);
  ca_encode_header(raw, CA_PING, 0);
  raw[0] = 2;
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_VERSION);
  // Lengths that cannot be right for the type.
  ca_encode_header(raw, CA_STDIN_EOF, 1);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_LENGTH);
  ca_encode_header(raw, CA_STDIN, 0);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_LENGTH);
  ca_encode_header(raw, CA_EXIT, 7);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_LENGTH);
  ca_encode_header(raw, CA_ERROR, 3);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_LENGTH);
  ca_encode_header(raw, CA_IDENTITY, CA_IDENTITY_MAX_SIZE + 1);
  EXPECT_EQ(ca_decode_header(raw, &h), CA_E_LENGTH);
}

TEST(AgentProtocol, ExecRoundTrip) {
  auto bytes = encodeExec({"sh", "-c", "echo hi"}, {"A=1", "PATH=/bin"}, true);
  ca_exec exec;
  ASSERT_EQ(decodeExec(bytes, &exec), CA_OK);
  ASSERT_EQ(exec.argc, 3u);
  EXPECT_STREQ(exec.argv[0], "sh");
  EXPECT_STREQ(exec.argv[2], "echo hi");
  EXPECT_EQ(exec.argv[3], nullptr);
  ASSERT_TRUE(exec.has_env);
  EXPECT_STREQ(exec.env[1], "PATH=/bin");
  EXPECT_EQ(exec.env[2], nullptr);
  std::free(exec.argv);

  bytes = encodeExec({"true"}, {}, false);
  ASSERT_EQ(decodeExec(bytes, &exec), CA_OK);
  EXPECT_FALSE(exec.has_env);
  EXPECT_EQ(exec.env, nullptr);
  std::free(exec.argv);
}

TEST(AgentProtocol, MalformedExecIsRejected) {
  ca_exec exec;
  auto good = encodeExec({"cat", "x"}, {"A=1"}, true);
  // Every truncation of a valid frame is rejected.
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + n);
    EXPECT_NE(decodeExec(cut, &exec), CA_OK) << "accepted " << n << " of " << good.size();
  }
  auto trailing = good;
  trailing.push_back(0);
  EXPECT_EQ(decodeExec(trailing, &exec), CA_E_TRAILING);

  std::vector<uint8_t> bad;
  putU32(bad, 0);
  putU32(bad, 0);  // argc 0
  putU32(bad, 0);
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_VALUE);

  bad.clear();
  putU32(bad, 0);
  putU32(bad, 0xffffffffu);  // absurd argc
  putU32(bad, 0);
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_VALUE);

  bad.clear();
  putU32(bad, 0);
  putU32(bad, 1);
  putU32(bad, 0);
  putU32(bad, 0xfffffff0u);  // string length past the end
  bad.push_back('a');
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_TRUNCATED);

  bad.clear();
  putU32(bad, 0);
  putU32(bad, 1);
  putU32(bad, 0);
  putU32(bad, 3);
  bad.insert(bad.end(), {'a', 0, 'b'});  // NUL inside a string
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_VALUE);

  bad.clear();
  putU32(bad, 0);  // env entries without the env flag
  putU32(bad, 1);
  putU32(bad, 1);
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_VALUE);

  bad.clear();
  putU32(bad, 8);  // unknown flag
  putU32(bad, 1);
  putU32(bad, 0);
  putU32(bad, 1);
  bad.push_back('a');
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_VALUE);

  bad.clear();
  putU32(bad, CA_EXEC_ENV);  // env entry without '='
  putU32(bad, 1);
  putU32(bad, 1);
  putU32(bad, 1);
  bad.push_back('a');
  putU32(bad, 3);
  bad.insert(bad.end(), {'A', 'B', 'C'});
  EXPECT_EQ(decodeExec(bad, &exec), CA_E_VALUE);

  // An argv too large for one frame is refused by the encoder.
  std::string huge(CA_MAX_PAYLOAD, 'x');
  const char* argv[] = {huge.c_str()};
  std::vector<uint8_t> out(2 * CA_MAX_PAYLOAD);
  EXPECT_EQ(ca_encode_exec(out.data(), out.size(), argv, 1, nullptr, 0, 0), CA_E_LENGTH);
}

TEST(AgentProtocol, RandomBytesNeverCrashTheDecoders) {
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    size_t n = rng() % 64;
    std::vector<uint8_t> bytes(n);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng() % 4 == 0 ? rng() : rng() % 8);
    ca_exec exec;
    if (decodeExec(bytes, &exec) == CA_OK) std::free(exec.argv);
    auto* copy = static_cast<uint8_t*>(std::malloc(n ? n : 1));
    if (n) std::memcpy(copy, bytes.data(), n);
    ca_identity id;
    ca_identity_result res;
    ca_exit ex;
    int32_t error;
    char text[CA_MAX_ERROR_TEXT + 1];
    ca_decode_identity(copy, n, &id);
    ca_decode_identity_result(copy, n, &res);
    ca_decode_exit(copy, n, &ex);
    ca_decode_error(copy, n, &error, text);
    std::free(copy);
  }
}

TEST(AgentProtocol, IdentityRoundTripAndValidation) {
  ca_identity id{};
  id.fields = CA_ID_HOSTNAME | CA_ID_SEED | CA_ID_CLOCK;
  std::strcpy(id.hostname, "fork-7.example");
  id.hostname_length = 14;
  id.seed_length = 32;
  for (int i = 0; i < 32; ++i) id.seed[i] = static_cast<uint8_t>(i * 7);
  id.clock_seconds = 1700000000;
  id.clock_nanoseconds = 123;
  uint8_t out[CA_IDENTITY_MAX_SIZE];
  long n = ca_encode_identity(out, sizeof out, &id);
  ASSERT_GT(n, 0);
  ca_identity back;
  ASSERT_EQ(ca_decode_identity(out, static_cast<size_t>(n), &back), CA_OK);
  EXPECT_STREQ(back.hostname, "fork-7.example");
  EXPECT_EQ(back.seed_length, 32u);
  EXPECT_EQ(back.seed[31], static_cast<uint8_t>(31 * 7));
  EXPECT_EQ(back.clock_seconds, 1700000000);
  for (long cut = 0; cut < n; ++cut) {
    EXPECT_NE(ca_decode_identity(out, static_cast<size_t>(cut), &back), CA_OK);
  }

  auto rejects = [&](ca_identity bad) {
    uint8_t buffer[CA_IDENTITY_MAX_SIZE];
    long len = ca_encode_identity(buffer, sizeof buffer, &bad);
    if (len < 0) return true;
    return ca_decode_identity(buffer, static_cast<size_t>(len), &back) != CA_OK;
  };
  ca_identity bad = id;
  std::strcpy(bad.hostname, "a b;rm -rf");
  bad.hostname_length = 10;
  EXPECT_TRUE(rejects(bad)) << "hostname with a space and ';'";
  bad = id;
  bad.hostname_length = 0;
  EXPECT_TRUE(rejects(bad)) << "empty hostname";
  bad = id;
  bad.clock_nanoseconds = 1000000000;
  EXPECT_TRUE(rejects(bad));
  bad = id;
  bad.clock_seconds = -5;
  EXPECT_TRUE(rejects(bad));
  bad = id;
  bad.fields |= 8;
  EXPECT_TRUE(rejects(bad));
  bad = id;
  bad.fields = CA_ID_CLOCK;  // hostname bytes without the flag
  EXPECT_TRUE(rejects(bad));
  bad = id;
  bad.seed_length = CA_MAX_SEED + 1;
  EXPECT_TRUE(rejects(bad));
}

TEST(AgentProtocol, ResultExitAndErrorRoundTrips) {
  ca_identity_result res{};
  res.applied = CA_ID_SEED;
  res.reseed_error = 25;
  res.entropy_avail = 256;
  res.crng_ready = 1;
  res.clock_seconds = 42;
  std::strcpy(res.hostname, "guest");
  res.hostname_length = 5;
  uint8_t out[CA_IDENTITY_RESULT_MAX_SIZE];
  long n = ca_encode_identity_result(out, sizeof out, &res);
  ASSERT_GT(n, 0);
  ca_identity_result back;
  ASSERT_EQ(ca_decode_identity_result(out, static_cast<size_t>(n), &back), CA_OK);
  EXPECT_EQ(back.reseed_error, 25);
  EXPECT_EQ(back.entropy_avail, 256);
  EXPECT_STREQ(back.hostname, "guest");
  out[n - 1] = 0;  // NUL in the hostname
  EXPECT_EQ(ca_decode_identity_result(out, static_cast<size_t>(n), &back), CA_E_VALUE);

  ca_exit ex{1, 9};
  uint8_t raw[CA_EXIT_SIZE];
  ca_encode_exit(raw, &ex);
  ca_exit exBack;
  ASSERT_EQ(ca_decode_exit(raw, sizeof raw, &exBack), CA_OK);
  EXPECT_EQ(exBack.kind, 1u);
  EXPECT_EQ(exBack.value, 9);
  ca_exit badExit{0, 300};
  ca_encode_exit(raw, &badExit);
  EXPECT_EQ(ca_decode_exit(raw, sizeof raw, &exBack), CA_E_VALUE);
  ca_exit badSignal{1, 0};
  ca_encode_exit(raw, &badSignal);
  EXPECT_EQ(ca_decode_exit(raw, sizeof raw, &exBack), CA_E_VALUE);

  uint8_t err[4 + CA_MAX_ERROR_TEXT];
  n = ca_encode_error(err, sizeof err, 2, "exec nope: No such file or directory");
  ASSERT_GT(n, 0);
  int32_t code;
  char text[CA_MAX_ERROR_TEXT + 1];
  ASSERT_EQ(ca_decode_error(err, static_cast<size_t>(n), &code, text), CA_OK);
  EXPECT_EQ(code, 2);
  EXPECT_STREQ(text, "exec nope: No such file or directory");
  EXPECT_EQ(ca_decode_error(err, 3, &code, text), CA_E_TRUNCATED);
}

}  // namespace
