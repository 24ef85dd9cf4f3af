#include "ipc/vhost-user/message.h"

#include <gtest/gtest.h>

namespace clonevm::ipc::vhost {
namespace {

TEST(MessageTest, RequestCodesAreTheSpecs) {
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetFeatures), 1u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kSetMemTable), 5u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetVringBase), 11u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetProtocolFeatures), 15u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kSetVringEnable), 18u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kSetBackendReqFd), 21u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetConfig), 24u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetInflightFd), 31u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kResetDevice), 34u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetMaxMemSlots), 36u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kAddMemReg), 37u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kGetStatus), 40u);
  EXPECT_EQ(static_cast<uint32_t>(FrontendRequest::kCheckDeviceState), 43u);
  EXPECT_EQ(static_cast<uint32_t>(BackendRequest::kConfigChangeMsg), 2u);
  EXPECT_EQ(static_cast<uint32_t>(BackendRequest::kSharedObjectLookup), 8u);
}

TEST(MessageTest, FeatureBitsAreTheSpecs) {
  EXPECT_EQ(feature::kProtocolFeatures, 30u);
  EXPECT_EQ(feature::kVersion1, 32u);
  EXPECT_EQ(feature::kRingIndirectDesc, 28u);
  EXPECT_EQ(feature::kRingEventIdx, 29u);
  EXPECT_EQ(protocol::kMq, 0u);
  EXPECT_EQ(protocol::kReplyAck, 3u);
  EXPECT_EQ(protocol::kBackendReq, 5u);
  EXPECT_EQ(protocol::kConfig, 9u);
  EXPECT_EQ(protocol::kInflightShmfd, 12u);
  EXPECT_EQ(protocol::kConfigureMemSlots, 15u);
  EXPECT_EQ(protocol::kStatus, 16u);
  EXPECT_EQ(protocol::kDeviceState, 19u);
}

TEST(MessageTest, NamesForLogsAndErrors) {
  EXPECT_EQ(requestName(FrontendRequest::kSetVringAddr), "VHOST_USER_SET_VRING_ADDR");
  EXPECT_EQ(requestShortName(FrontendRequest::kSetVringAddr), "SET_VRING_ADDR");
  EXPECT_EQ(requestName(static_cast<FrontendRequest>(77)), "request 77");
  EXPECT_EQ(requestName(BackendRequest::kConfigChangeMsg), "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
  EXPECT_EQ(protocolFeatureName(protocol::kReplyAck), "VHOST_USER_PROTOCOL_F_REPLY_ACK");
}

Message request(FrontendRequest code, std::vector<uint8_t> payload, size_t fds = 0,
                uint32_t flags = kVersion) {
  Message m;
  m.header = {static_cast<uint32_t>(code), flags, static_cast<uint32_t>(payload.size())};
  m.payload = std::move(payload);
  for (size_t i = 0; i < fds; ++i) m.fds.emplace_back(::dup(0));
  return m;
}

template <typename T>
std::vector<uint8_t> bytes(const T& v) {
  auto* p = reinterpret_cast<const uint8_t*>(&v);
  return std::vector<uint8_t>(p, p + sizeof(T));
}

void expectInvalid(const Message& m, const std::string& fragment) {
  try {
    validateFrontendRequest(m);
    FAIL() << "accepted a message that should fail with '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(MessageTest, ValidRequestsPass) {
  EXPECT_NO_THROW(validateFrontendRequest(request(FrontendRequest::kGetFeatures, {})));
  EXPECT_NO_THROW(validateFrontendRequest(request(FrontendRequest::kSetFeatures, bytes(uint64_t{1}))));
  EXPECT_NO_THROW(validateFrontendRequest(
      request(FrontendRequest::kSetVringKick, bytes(uint64_t{3}), 1)));
  EXPECT_NO_THROW(validateFrontendRequest(
      request(FrontendRequest::kSetVringCall, bytes(uint64_t{kVringNoFdFlag | 1}), 0)));
  MemoryTable table{};
  table.header.regionCount = 2;
  auto payload = bytes(table);
  payload.resize(8 + 2 * 32);
  EXPECT_NO_THROW(validateFrontendRequest(request(FrontendRequest::kSetMemTable, payload, 2)));
  EXPECT_NO_THROW(validateFrontendRequest(
      request(FrontendRequest::kSetVringEnable, bytes(VringState{0, 1}), 0,
              kVersion | kNeedReplyFlag)));
}

TEST(MessageTest, WrongPayloadSizesAreRejected) {
  expectInvalid(request(FrontendRequest::kSetFeatures, {1, 2, 3, 4}), "payload is 4 bytes, must be 8");
  expectInvalid(request(FrontendRequest::kGetFeatures, {0}), "must be 0");
  expectInvalid(request(FrontendRequest::kSetVringAddr, std::vector<uint8_t>(39)), "must be 40");
  expectInvalid(request(FrontendRequest::kSetVringNum, std::vector<uint8_t>(16)), "must be 8");
  MemoryTable table{};
  table.header.regionCount = 2;
  auto payload = bytes(table);
  payload.resize(8 + 1 * 32);  // says 2, carries 1
  expectInvalid(request(FrontendRequest::kSetMemTable, payload, 2), "2 regions need 72 payload bytes");
  table.header.regionCount = 9;
  expectInvalid(request(FrontendRequest::kSetMemTable, bytes(table), 8), "at most 8");
  ConfigHeader config{0, 8, 0};
  auto configBytes = bytes(config);
  configBytes.resize(12 + 4);
  expectInvalid(request(FrontendRequest::kGetConfig, configBytes), "config size 8 needs 20");
}

TEST(MessageTest, WrongFdCountsAreRejected) {
  expectInvalid(request(FrontendRequest::kSetVringKick, bytes(uint64_t{0}), 0), "0 file descriptors");
  expectInvalid(request(FrontendRequest::kSetVringKick, bytes(uint64_t{kVringNoFdFlag}), 1),
                "1 file descriptors with the no-fd flag set");
  expectInvalid(request(FrontendRequest::kSetFeatures, bytes(uint64_t{0}), 1), "1 file descriptors");
  expectInvalid(request(FrontendRequest::kAddMemReg, std::vector<uint8_t>(40), 0), "must be 1");
  MemoryTable table{};
  table.header.regionCount = 1;
  auto payload = bytes(table);
  payload.resize(8 + 32);
  expectInvalid(request(FrontendRequest::kSetMemTable, payload, 2), "need 1 file descriptors, got 2");
}

TEST(MessageTest, BadHeadersAreRejected) {
  expectInvalid(request(FrontendRequest::kGetFeatures, {}, 0, 0x2), "unsupported version 2");
  expectInvalid(request(FrontendRequest::kGetFeatures, {}, 0, kVersion | 0x100), "unknown flags");
  expectInvalid(request(FrontendRequest::kGetFeatures, {}, 0, kVersion | kReplyFlag), "REPLY flag");
  expectInvalid(request(static_cast<FrontendRequest>(99), {}), "unknown front-end request 99");
  expectInvalid(request(FrontendRequest::kNone, {}), "unknown front-end request 0");
  expectInvalid(request(FrontendRequest::kSetVringKick, bytes(uint64_t{0x1000}), 1), "reserved bits");
  Message m = request(FrontendRequest::kSetFeatures, bytes(uint64_t{0}));
  m.header.size = 16;  // disagrees with what arrived
  expectInvalid(m, "header says 16 payload bytes, 8 arrived");
}

TEST(MessageTest, RepliesAreChecked) {
  Message reply = Message::make(static_cast<uint32_t>(FrontendRequest::kGetFeatures), kReplyFlag,
                                uint64_t{5});
  EXPECT_NO_THROW(validateReply(reply, FrontendRequest::kGetFeatures, 8));
  EXPECT_THROW(validateReply(reply, FrontendRequest::kGetProtocolFeatures, 8), Error);
  EXPECT_THROW(validateReply(reply, FrontendRequest::kGetFeatures, 4), Error);
  reply.header.flags = kVersion;
  EXPECT_THROW(validateReply(reply, FrontendRequest::kGetFeatures, 8), Error);
}

TEST(MessageTest, PayloadAsRefusesShortPayloads) {
  Message m = request(FrontendRequest::kSetFeatures, {1, 2});
  EXPECT_THROW(m.payloadAs<uint64_t>(), Error);
}

}  // namespace
}  // namespace clonevm::ipc::vhost
