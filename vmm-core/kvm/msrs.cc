#include "vmm-core/kvm/msrs.h"

namespace clonevm::vmm {
namespace {

kvm_msr_entry msr(uint32_t index, uint64_t value) {
  kvm_msr_entry entry{};
  entry.index = index;
  entry.data = value;
  return entry;
}

constexpr uint64_t kMiscEnableFastString = 1;
constexpr uint64_t kMtrrEnable = 1u << 11;
constexpr uint64_t kMtrrTypeWriteBack = 6;

}  // namespace

std::vector<kvm_msr_entry> bootMsrs() {
  return {
      msr(kMsrIa32SysenterCs, 0),
      msr(kMsrIa32SysenterEsp, 0),
      msr(kMsrIa32SysenterEip, 0),
      msr(kMsrStar, 0),
      msr(kMsrLstar, 0),
      msr(kMsrCstar, 0),
      msr(kMsrSyscallMask, 0),
      msr(kMsrKernelGsBase, 0),
      msr(kMsrIa32MiscEnable, kMiscEnableFastString),
      msr(kMsrMtrrDefType, kMtrrEnable | kMtrrTypeWriteBack),
  };
}

}  // namespace clonevm::vmm
