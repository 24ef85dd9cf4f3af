// Device state through save, encode, decode and restore into a fresh device: the guest reads
// the same registers from the restored one.
#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/devices/fake_irq_line.h"
#include "vmm-core/snapshot/machine_state.h"

namespace clonevm::vmm::snapshot {
namespace {

class DeviceStateTest : public ::testing::Test {
 protected:
  spdlog::logger log_{"test", std::make_shared<spdlog::sinks::null_sink_mt>()};

  uint8_t readPort(BusDevice& device, uint64_t offset) {
    uint8_t value = 0;
    device.read(offset, {&value, 1});
    return value;
  }
  void writePort(BusDevice& device, uint64_t offset, uint8_t value) {
    device.write(offset, {&value, 1});
  }
  // Through the file format, as a fork would get it.
  DeviceStates throughFile(const DeviceStates& devices) {
    MachineState state;
    state.vm.picMaster.chip_id = KVM_IRQCHIP_PIC_MASTER;
    state.vm.picSlave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    state.vm.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    VcpuState vcpu;
    vcpu.cpuid.resize(1);
    vcpu.xsave.resize(1024);
    state.vcpus.push_back(vcpu);
    state.devices = devices;
    return decodeMachineState(encodeMachineState(state), "test").devices;
  }
};

TEST_F(DeviceStateTest, SerialRegistersAndFifoSurvive) {
  FakeIrqLine irq;
  Serial original(irq, [](std::span<const uint8_t>) {}, log_);
  writePort(original, 3, 0x80);  // DLAB
  writePort(original, 0, 0x01);  // divisor 115200
  writePort(original, 3, 0x03);  // 8N1
  writePort(original, 2, 0xc7);  // FIFO on
  writePort(original, 7, 0x5a);  // scratch
  writePort(original, 1, 0x01);  // RX interrupt on
  uint8_t input[] = {'h', 'i'};
  original.enqueueInput(input);
  DeviceStates saved;
  saved.serial = original.saveState();

  FakeIrqLine restoredIrq;
  Serial restored(restoredIrq, [](std::span<const uint8_t>) {}, log_);
  restored.restoreState(throughFile(saved).serial);
  EXPECT_EQ(readPort(restored, 7), 0x5a);
  EXPECT_EQ(readPort(restored, 3), 0x03);
  EXPECT_EQ(readPort(restored, 1), 0x01);
  EXPECT_TRUE(restoredIrq.level) << "received data with RX interrupts on: the line is up";
  EXPECT_EQ(readPort(restored, 0), 'h');
  EXPECT_EQ(readPort(restored, 0), 'i');
}

TEST_F(DeviceStateTest, AcpiPmTimerContinuesFromItsCount) {
  FakeIrqLine sci;
  uint64_t now = 1'000'000'000;
  AcpiPm original(sci, [] {}, [&] { return now; }, log_);
  now += 500'000'000;  // half a second: ~1.79 M ticks
  DeviceStates saved;
  saved.acpiPm = original.saveState();
  uint64_t otherNow = 77;  // another process's monotonic clock
  AcpiPm restored(sci, [] {}, [&] { return otherNow; }, log_);
  restored.restoreState(throughFile(saved).acpiPm);
  EXPECT_NEAR(static_cast<double>(restored.saveState().timer), 3'579'545 / 2.0, 2);
}

TEST_F(DeviceStateTest, I8042CommandByteSurvives) {
  FakeIrqLine kbd, aux;
  I8042 original(kbd, aux, [] {}, log_);
  writePort(original, I8042::kCommandOffset, 0x60);  // write command byte
  writePort(original, I8042::kDataOffset, 0x45);
  DeviceStates saved;
  saved.i8042 = original.saveState();
  I8042 restored(kbd, aux, [] {}, log_);
  restored.restoreState(throughFile(saved).i8042);
  writePort(restored, I8042::kCommandOffset, 0x20);  // read command byte
  EXPECT_EQ(readPort(restored, I8042::kDataOffset), 0x45);
}

}  // namespace
}  // namespace clonevm::vmm::snapshot
