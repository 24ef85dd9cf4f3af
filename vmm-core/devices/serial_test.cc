#include "vmm-core/devices/serial.h"

#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/devices/fake_irq_line.h"

namespace clonevm::vmm {
namespace {

constexpr uint8_t RBR = 0, THR = 0, DLL = 0, IER = 1, DLM = 1, IIR = 2, FCR = 2, LCR = 3,
                  MCR = 4, LSR = 5, MSR = 6, SCR = 7;

class SerialTest : public ::testing::Test {
 protected:
  explicit SerialTest(Serial::Options options = {})
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        serial_(irq_, [this](std::span<const uint8_t> bytes) {
          output_.append(bytes.begin(), bytes.end());
          ++sinkCalls_;
        }, log_, options) {}

  uint8_t in(uint8_t reg) {
    uint8_t value = 0;
    serial_.read(reg, {&value, 1});
    return value;
  }
  void out(uint8_t reg, uint8_t value) { serial_.write(reg, {&value, 1}); }
  void enqueue(const std::string& text) {
    ASSERT_EQ(serial_.enqueueInput({reinterpret_cast<const uint8_t*>(text.data()), text.size()}),
              text.size());
  }

  FakeIrqLine irq_;
  spdlog::logger log_;
  std::string output_;
  int sinkCalls_ = 0;
  Serial serial_;
};

TEST_F(SerialTest, ResetState) {
  EXPECT_EQ(in(IER), 0);
  EXPECT_EQ(in(IIR), 0x01);  // no interrupt, FIFO off
  EXPECT_EQ(in(LSR), 0x60);  // THRE | TEMT
  EXPECT_EQ(in(MSR) & 0xf0, 0xb0);  // DCD, DSR, CTS
  EXPECT_FALSE(irq_.level);
}

TEST_F(SerialTest, ThrEmptyInterruptIsRaisedByEnablingItAndAcknowledgedByIirRead) {
  out(IER, 0x02);
  EXPECT_TRUE(irq_.level);
  EXPECT_EQ(in(IIR), 0x02);
  EXPECT_FALSE(irq_.level);  // reading IIR acknowledged it
  EXPECT_EQ(in(IIR), 0x01);
  // Linux's THRE re-assertion test: disable, re-enable, THRE is reported again.
  out(IER, 0x00);
  out(IER, 0x02);
  EXPECT_TRUE(irq_.level);
  EXPECT_EQ(in(IIR), 0x02);
  // Writing THR re-arms it too (the byte is gone at once).
  out(THR, 'x');
  EXPECT_TRUE(irq_.level);
  out(IER, 0x00);
  EXPECT_FALSE(irq_.level);
  EXPECT_EQ(irq_.history, (std::vector<bool>{true, false, true, false, true, false}));
}

TEST_F(SerialTest, IerKeepsOnlyTheLowNibble) {
  out(IER, 0xff);
  EXPECT_EQ(in(IER), 0x0f);
  out(IER, 0x40);  // XScale's UUE bit does not stick on a 16550A
  EXPECT_EQ(in(IER), 0x00);
}

TEST_F(SerialTest, DivisorLatchIsReachedWithDlabAndHidesThrAndIer) {
  out(IER, 0x05);
  out(LCR, 0x83);
  EXPECT_EQ(in(LCR), 0x83);
  EXPECT_EQ(in(DLL), 0x0c);  // reset divisor
  out(DLL, 0x01);
  out(DLM, 0x02);
  EXPECT_EQ(in(DLL), 0x01);
  EXPECT_EQ(in(DLM), 0x02);
  out(LCR, 0x03);
  EXPECT_EQ(in(IER), 0x05);  // the DLM write did not touch IER
  EXPECT_TRUE(output_.empty());  // the DLL write did not transmit
  out(LCR, 0x80);
  EXPECT_EQ(in(DLL), 0x01);
}

TEST_F(SerialTest, FifoEnableShowsInIirTopBits) {
  out(FCR, 0x01);
  EXPECT_EQ(in(IIR), 0xc1);
  out(FCR, 0x00);
  EXPECT_EQ(in(IIR), 0x01);
  out(FCR, 0x21);  // 16750's 64-byte bit: a 16550A never shows IIR bit 5
  EXPECT_EQ(in(IIR), 0xc1);
}

TEST_F(SerialTest, LoopbackRoutesThrToRbrAndModemControlToStatus) {
  out(MCR, 0x10 | 0x0a);  // LOOP | OUT2 | RTS: Linux's autoconfig probe
  EXPECT_EQ(in(MSR) & 0xf0, 0x90);  // DCD (from OUT2) | CTS (from RTS)
  out(MCR, 0x10 | 0x05);  // LOOP | OUT1 | DTR
  EXPECT_EQ(in(MSR) & 0xf0, 0x60);  // RI | DSR
  out(THR, 'L');
  EXPECT_TRUE(output_.empty());
  EXPECT_EQ(in(LSR) & 0x01, 0x01);
  EXPECT_EQ(in(RBR), 'L');
  EXPECT_EQ(in(LSR) & 0x01, 0x00);
  out(MCR, 0x08);
  out(THR, 'N');
  out(SCR, 0);  // any other access flushes the batch
  EXPECT_EQ(output_, "N");
}

TEST_F(SerialTest, ModemStatusDeltasAndInterrupt) {
  out(MCR, 0x10);       // loopback, all outputs low: CTS, DSR, DCD drop
  EXPECT_EQ(in(MSR), 0x0b);  // DCTS | DDSR | DDCD, lines low
  EXPECT_EQ(in(MSR), 0x00);  // deltas clear on read
  out(IER, 0x08);
  out(MCR, 0x10 | 0x04);  // OUT1 -> RI rises: no TERI on the leading edge
  EXPECT_FALSE(irq_.level);
  out(MCR, 0x10);  // RI falls: TERI
  EXPECT_TRUE(irq_.level);
  EXPECT_EQ(in(IIR), 0x00);
  EXPECT_EQ(in(MSR), 0x04);
  EXPECT_FALSE(irq_.level);
}

TEST_F(SerialTest, ScratchRegister) {
  out(SCR, 0xa5);
  EXPECT_EQ(in(SCR), 0xa5);
  out(SCR, 0x5a);
  EXPECT_EQ(in(SCR), 0x5a);
}

// The register sequence of Linux's autoconfig() and autoconfig_16550a() (8250_port.c).
TEST_F(SerialTest, PassesLinux8250AutoconfigAs16550A) {
  uint8_t saved = in(IER);
  out(IER, 0);
  uint8_t scratch2 = in(IER) & 0x0f;
  out(IER, 0x0f);
  uint8_t scratch3 = in(IER) & 0x0f;
  out(IER, saved);
  ASSERT_EQ(scratch2, 0);
  ASSERT_EQ(scratch3, 0x0f);

  uint8_t saveMcr = in(MCR);
  uint8_t saveLcr = in(LCR);
  out(MCR, 0x10 | 0x0a);
  uint8_t status = in(MSR) & 0xf0;
  out(MCR, saveMcr);
  ASSERT_EQ(status, 0x90);

  out(LCR, 0xbf);
  out(FCR, 0);  // EFR on other chips
  out(LCR, 0);
  out(FCR, 0x01);
  ASSERT_EQ(in(IIR) >> 6, 3);  // 16550A

  out(LCR, 0x80);
  ASSERT_NE(in(IIR), 0);  // no EFR (ST16C650V1)
  out(LCR, 0xbf);
  ASSERT_NE(in(IIR), 0);  // no EFR (ST16C650V2)
  out(LCR, 0);
  uint8_t mcr = in(MCR);
  out(LCR, 0xe0);
  uint8_t excr1 = in(2);
  ASSERT_EQ((excr1 ^ mcr) & 0x10, 0);
  out(LCR, 0);
  out(MCR, mcr ^ 0x10);
  out(LCR, 0xe0);
  excr1 = in(2);
  out(LCR, 0);
  out(MCR, mcr);
  ASSERT_EQ((excr1 ^ mcr) & 0x10, 0);  // not a NatSemi SuperIO

  out(FCR, 0x21);
  uint8_t iir1 = in(IIR) >> 5;
  out(FCR, 0x01);
  out(LCR, 0x80);
  out(FCR, 0x21);
  uint8_t iir2 = in(IIR) >> 5;
  out(FCR, 0x01);
  out(LCR, 0);
  ASSERT_FALSE(iir1 == 6 && iir2 == 7);  // not a TI16750

  // size_fifo(): count how many loopback bytes the RX FIFO keeps.
  out(FCR, 0x07);
  out(MCR, 0x10);
  out(LCR, 0x80);
  out(DLL, 1);
  out(DLM, 0);
  out(LCR, 0x03);
  for (int i = 0; i < 256; ++i) out(THR, static_cast<uint8_t>(i));
  int count = 0;
  while ((in(LSR) & 0x01) && count < 256) {
    EXPECT_EQ(in(RBR), count);
    ++count;
  }
  EXPECT_EQ(count, 16);
  out(LCR, saveLcr);
  EXPECT_TRUE(output_.empty());  // nothing leaked to the console during the probe
}

TEST_F(SerialTest, TransmittedBytesReachTheSinkBatched) {
  for (char c : std::string("hello")) out(THR, c);
  EXPECT_EQ(output_, "");  // batched: nothing else touched the UART yet
  EXPECT_EQ(in(LSR) & 0x60, 0x60);  // one LSR poll keeps the batch
  EXPECT_EQ(output_, "");
  in(IIR);
  EXPECT_EQ(output_, "hello");
  EXPECT_EQ(sinkCalls_, 1);
  for (char c : std::string("a\nb")) out(THR, c);
  EXPECT_EQ(output_, "helloa\n");  // a newline flushes
  in(LSR);
  in(LSR);  // polling LSR twice flushes (the guest waits for input)
  EXPECT_EQ(output_, "helloa\nb");
}

TEST_F(SerialTest, PolledConsoleWriteIsOneSinkCall) {
  std::string text = "polled";
  for (char c : text) {
    while (!(in(LSR) & 0x20)) {
    }
    out(THR, c);
  }
  in(LSR);        // wait for BOTH_EMPTY
  out(IER, 0);    // restore IER
  EXPECT_EQ(output_, text);
  EXPECT_EQ(sinkCalls_, 1);
}

TEST_F(SerialTest, FlushAndDestructorDeliverTheTail) {
  out(THR, 'z');
  EXPECT_EQ(output_, "");
  serial_.flush();
  EXPECT_EQ(output_, "z");
  std::string tail;
  {
    Serial other(irq_, [&](std::span<const uint8_t> b) { tail.append(b.begin(), b.end()); }, log_);
    uint8_t c = 'q';
    other.write(THR, {&c, 1});
    EXPECT_EQ(tail, "");
  }
  EXPECT_EQ(tail, "q");
}

class SmallBatchSerialTest : public SerialTest {
 protected:
  SmallBatchSerialTest() : SerialTest(Serial::Options{.outputBatch = 4}) {}
};

TEST_F(SmallBatchSerialTest, FullBatchIsHandedOver) {
  for (char c : std::string("abcdef")) out(THR, c);
  EXPECT_EQ(output_, "abcd");
  EXPECT_EQ(sinkCalls_, 1);
}

TEST_F(SerialTest, InputIsReadableThroughRbrWithDataReady) {
  EXPECT_EQ(in(LSR) & 0x01, 0);
  enqueue("abc");
  EXPECT_EQ(in(LSR) & 0x01, 1);
  EXPECT_EQ(in(RBR), 'a');
  EXPECT_EQ(in(RBR), 'b');
  EXPECT_EQ(in(LSR) & 0x01, 1);
  EXPECT_EQ(in(RBR), 'c');
  EXPECT_EQ(in(LSR) & 0x01, 0);
  EXPECT_EQ(serial_.pendingInput(), 0u);
}

TEST_F(SerialTest, NothingIsLostWhenInputExceedsTheFifo) {
  out(FCR, 0x07);
  std::string input;
  for (int i = 0; i < 1000; ++i) input.push_back(static_cast<char>('!' + i % 90));
  enqueue(input);
  std::string received;
  while (in(LSR) & 0x01) received.push_back(static_cast<char>(in(RBR)));
  EXPECT_EQ(received, input);
  EXPECT_EQ(in(LSR) & 0x02, 0);  // no overrun
}

TEST_F(SerialTest, RxInterruptFollowsDataAndTriggerLevel) {
  out(IER, 0x01);
  enqueue("xy");
  EXPECT_TRUE(irq_.level);
  EXPECT_EQ(in(IIR), 0x04);  // FIFO off: received data available
  in(RBR);
  EXPECT_TRUE(irq_.level);
  in(RBR);
  EXPECT_FALSE(irq_.level);
  EXPECT_EQ(irq_.history, (std::vector<bool>{true, false}));

  out(FCR, 0xc1);  // FIFO on, trigger at 14 bytes
  enqueue("abc");
  EXPECT_EQ(in(IIR), 0xcc);  // below the trigger: character timeout
  enqueue("defghijklmn");
  EXPECT_EQ(in(IIR), 0xc4);  // 14 bytes: data available
  while (in(LSR) & 0x01) in(RBR);
  EXPECT_EQ(in(IIR), 0xc1);
  EXPECT_FALSE(irq_.level);
}

TEST_F(SerialTest, InterruptPriorities) {
  out(FCR, 0x01);
  out(MCR, 0x10);  // loopback: drop CTS/DSR/DCD, so modem deltas are pending
  for (int i = 0; i < 17; ++i) out(THR, 'o');  // one too many: overrun
  out(IER, 0x0f);
  EXPECT_EQ(in(IIR), 0xc6);  // line status first
  EXPECT_EQ(in(LSR) & 0x03, 0x03);  // DR | OE, OE now cleared
  EXPECT_EQ(in(IIR), 0xc4);  // then received data (16 >= trigger 1)
  while (in(LSR) & 0x01) in(RBR);
  EXPECT_EQ(in(IIR), 0xc2);  // then THR empty (acknowledged by this read)
  EXPECT_EQ(in(IIR), 0xc0);  // then modem status
  in(MSR);
  EXPECT_EQ(in(IIR), 0xc1);
  EXPECT_FALSE(irq_.level);
}

TEST_F(SerialTest, LoopbackHoldsHostInputBack) {
  out(MCR, 0x10);
  enqueue("h");
  EXPECT_EQ(in(LSR) & 0x01, 0);
  out(MCR, 0x08);
  EXPECT_EQ(in(RBR), 'h');
}

TEST_F(SerialTest, FifoResetDropsOnlyTheChipFifo) {
  out(FCR, 0x01);
  std::string input(20, 'k');
  input[16] = 'K';
  enqueue(input);
  out(FCR, 0x03);  // clear RX FIFO: the 16 bytes in the chip are gone
  EXPECT_EQ(in(RBR), 'K');
  EXPECT_EQ(serial_.pendingInput(), 3u);
}

class LimitedInputSerialTest : public SerialTest {
 protected:
  LimitedInputSerialTest() : SerialTest(Serial::Options{.inputQueueLimit = 4}) {}
};

TEST_F(LimitedInputSerialTest, InputBeyondTheHostQueueLimitIsRefusedNotDropped) {
  const uint8_t bytes[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  size_t accepted = serial_.enqueueInput(bytes);
  EXPECT_LT(accepted, 10u);
  EXPECT_GE(accepted, 4u);
  std::vector<uint8_t> received;
  while (in(LSR) & 0x01) received.push_back(in(RBR));
  EXPECT_EQ(received, std::vector<uint8_t>(bytes, bytes + accepted));
}

TEST_F(LimitedInputSerialTest, ConcurrentProducerAndGuestLoseNothing) {
  // The host stdin thread retries what the bounded queue refused; a vCPU drains RBR.
  std::vector<uint8_t> input(20000);
  for (size_t i = 0; i < input.size(); ++i) input[i] = static_cast<uint8_t>(i * 7 + i / 251);
  out(FCR, 0x01);
  out(IER, 0x01);
  std::thread producer([&] {
    std::span<const uint8_t> rest(input);
    while (!rest.empty()) {
      size_t accepted = serial_.enqueueInput(rest.subspan(0, std::min<size_t>(rest.size(), 5)));
      rest = rest.subspan(accepted);
      if (accepted == 0) std::this_thread::yield();
    }
  });
  std::vector<uint8_t> received;
  while (received.size() < input.size()) {
    if (in(LSR) & 0x01) {
      received.push_back(in(RBR));
    } else {
      std::this_thread::yield();
    }
  }
  producer.join();
  EXPECT_EQ(received, input);
  EXPECT_EQ(in(LSR) & 0x03, 0);
  EXPECT_FALSE(irq_.level);
}

TEST_F(SerialTest, WideAndOutOfRangeAccessesAreHarmless) {
  const uint8_t two[2] = {0x03, 0x0b};  // LCR, MCR in one 16-bit write
  serial_.write(LCR, two);
  EXPECT_EQ(in(LCR), 0x03);
  EXPECT_EQ(in(MCR), 0x0b);
  uint8_t bytes[2] = {};
  serial_.read(7, bytes);  // SCR and one past the end
  EXPECT_EQ(bytes[1], 0xff);
  const uint8_t junk = 0x55;
  serial_.write(12, {&junk, 1});
  out(LSR, 0);  // read-only registers ignore writes
  EXPECT_EQ(in(LSR), 0x60);
}

}  // namespace
}  // namespace clonevm::vmm
