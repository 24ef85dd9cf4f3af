# Test-harness "firmware" for qemu_boot_check.sh: from the x86 reset state straight to Linux's
# 64-bit entry, using only state Clone's boot code produced. boot_check_image writes, at
# 0x6000, the values setupLongModeSregs() and linuxEntryRegs() chose; this stub loads them in
# the order the architecture requires and jumps. Runs at 0xFFFF0000 (reset CS base).
.set BLOCK, 0x6000
.set GDTR, BLOCK + 0x00      # limit16, base32
.set IDTR, BLOCK + 0x08      # limit16, base32
.set CR0, BLOCK + 0x10
.set CR3, BLOCK + 0x14
.set CR4, BLOCK + 0x18
.set EFER, BLOCK + 0x1c
.set FAR_JUMP, BLOCK + 0x20  # offset32 (filled here), code selector16
.set DATA_SELECTOR, BLOCK + 0x26
.set RIP, BLOCK + 0x28
.set RSI, BLOCK + 0x30
.set RSP, BLOCK + 0x38

.code16
.globl _start
_start:
  cli
  cld
  # Enable QEMU's PIIX4 PM I/O block at 0x600 as real firmware would (PMBA, then PMIOSE), so
  # the PM1a blocks and PM timer sit where our FADT says.
  movl $0x80000B40, %eax
  movw $0xcf8, %dx
  outl %eax, %dx
  movl $0x601, %eax
  movw $0xcfc, %dx
  outl %eax, %dx
  movl $0x80000B80, %eax
  movw $0xcf8, %dx
  outl %eax, %dx
  movb $1, %al
  movw $0xcfc, %dx
  outb %al, %dx

  xorw %ax, %ax
  movw %ax, %ds
  lgdtl GDTR
  lidtl IDTR
  movl CR4, %eax
  movl %eax, %cr4
  movl CR3, %eax
  movl %eax, %cr3
  movl $0xC0000080, %ecx
  rdmsr
  movl EFER, %eax
  andl $~0x400, %eax          # LMA is set by the CPU when paging turns on
  wrmsr
  movl CR0, %eax
  movl %eax, %cr0             # PE and PG together: real mode straight to long mode
  movl $long_mode, FAR_JUMP
  ljmpl *FAR_JUMP

.code64
long_mode:
  movzwl DATA_SELECTOR, %eax
  movl %eax, %ds
  movl %eax, %es
  movl %eax, %ss
  movl %eax, %fs
  movl %eax, %gs
  movq RSP, %rsp
  movq RSI, %rsi
  jmp *RIP
