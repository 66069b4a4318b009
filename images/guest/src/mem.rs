//! The C memory primitives the precompiled `core`/`alloc` of the host target
//! expect (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`), written in
//! assembly so LLVM cannot turn them back into calls to themselves; and the
//! `rust_eh_personality` symbol the precompiled `liballoc` references even with
//! `panic = "abort"`.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.mem, "ax"

    // void *memcpy(void *dst, const void *src, size_t n)
    .globl memcpy
    .type memcpy, @function
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

    // void *memmove(void *dst, const void *src, size_t n)
    .globl memmove
    .type memmove, @function
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 1f                  // dst <= src: forward copy is safe
    lea r8, [rsi + rdx]
    cmp rdi, r8
    jae 1f                  // no overlap
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
1:
    rep movsb
    ret

    // void *memset(void *dst, int c, size_t n)
    .globl memset
    .type memset, @function
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    // int memcmp(const void *a, const void *b, size_t n)
    .globl memcmp
    .type memcmp, @function
memcmp:
    .globl bcmp
    .type bcmp, @function
bcmp:
    xor eax, eax
    test rdx, rdx
    jz 3f
2:
    movzx eax, byte ptr [rdi]
    movzx ecx, byte ptr [rsi]
    sub eax, ecx
    jnz 3f
    inc rdi
    inc rsi
    dec rdx
    jnz 2b
3:
    ret
"#
);

/// Never called (`panic = "abort"`), but the precompiled `liballoc` of the
/// host target references it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
