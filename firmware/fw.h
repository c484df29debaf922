/* Board support shared by the firmware images: semihosting, exit, stack painting, SysTick. */
#ifndef FW_H
#define FW_H

#include <stdint.h>

/* Semihosting call (BKPT 0xAB on M-profile). */
static inline uint32_t fw_semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

/* Writes a NUL-terminated string to the host's stdout (SYS_WRITE0): no libc needed. */
static inline void fw_write0(const char *s) { fw_semihost(0x04, s); }

/* Ends the QEMU run: exit status 0 for code 0, 1 otherwise (SYS_EXIT, AArch32 form). */
void fw_exit(int code) __attribute__((noreturn));

/* The current stack pointer. */
static inline uint32_t fw_sp(void)
{
    uint32_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

/* Stack painting: fill the free stack below the caller with a pattern; after some calls,
   fw_stack_lowest() is the lowest address they wrote, so `sp_before - fw_stack_lowest()` is
   their peak stack use. */
void fw_stack_paint(void);
uint32_t fw_stack_lowest(void);
uint32_t fw_stack_size(void);

/* SysTick as a free-running 24-bit down-counter on the processor clock. Under
   `qemu-system-arm -icount shift=0` virtual time advances by 1 ns per instruction, so the
   ticks count instructions (calibrated in fw_ticks_per_kinsn). */
#define FW_SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define FW_SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define FW_SYST_CVR (*(volatile uint32_t *)0xE000E018u)
static inline void fw_systick_start(void)
{
    FW_SYST_RVR = 0x00FFFFFFu;
    FW_SYST_CVR = 0u;
    FW_SYST_CSR = 5u; /* enable, processor clock, no interrupt */
}
static inline uint32_t fw_systick(void) { return FW_SYST_CVR; }
static inline uint32_t fw_ticks_between(uint32_t start, uint32_t end)
{
    return (start - end) & 0x00FFFFFFu;
}

/* Runs exactly 2*n + a few instructions (a subs/bne loop), to calibrate the SysTick. */
void fw_spin(uint32_t n);

/* Formats v as 8 lowercase hex digits into out (no NUL). */
static inline void fw_hex32(char *out, uint32_t v)
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 7; i >= 0; i--) {
        out[i] = digits[v & 15u];
        v >>= 4;
    }
}

/* Formats v in decimal into out, NUL-terminated; returns the length. */
static inline int fw_dec(char *out, uint32_t v)
{
    char tmp[10];
    int n = 0, i = 0;
    do {
        tmp[n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    while (n) out[i++] = tmp[--n];
    out[i] = 0;
    return i;
}

#endif
