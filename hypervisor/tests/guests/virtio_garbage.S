/* A hostile guest for the device tests: it drives the first virtio-mmio device (at
 * 0xd0000000) against the protocol, then reports on serial whether the device says
 * NEEDS_RESET, and stops. Entered in long mode at CPL 0 by shrink-vmm (a few dozen
 * instructions: fine even where CPL 0 is emulated). */
.globl _start
.text
_start:
  mov $0xd0000000, %rbx
  movl $3, 0x70(%rbx)          /* ACKNOWLEDGE | DRIVER */
  movl $16, 0x38(%rbx)         /* QueueNum before FEATURES_OK: a protocol violation */
  movl $0xdeadbeef, 0x00(%rbx) /* write to the read-only magic register */
  movl $0xffffffff, 0x70(%rbx) /* nonsense status */
  mov 0x70(%rbx), %eax
  mov $0x3f8, %dx
  test $0x40, %eax
  jz 2f
  lea msg_reset(%rip), %rsi
  jmp 3f
2:lea msg_ok(%rip), %rsi
3:movb (%rsi), %al
  test %al, %al
  jz 4f
  out %al, (%dx)
  inc %rsi
  jmp 3b
4:cli
  hlt
  jmp 4b
.data
msg_reset: .asciz "virtio status: needs-reset\n"
msg_ok:    .asciz "virtio status: ok\n"
