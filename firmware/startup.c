/* Vector table, reset and fault handlers, and the fw.h helpers for every board.
   FW_NO_LIBC: the image does not link newlib (the size report's minimal firmware). */
#include <stdint.h>

#include "fw.h"

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[];
extern uint32_t __stack_top[], __stack_limit[];
int main(void);

#ifndef FW_NO_LIBC
extern void initialise_monitor_handles(void);
extern uint32_t __heap_limit; /* librdimon's sbrk never grows the heap past it */
#endif

void Reset_Handler(void) __attribute__((noreturn));
void HardFault_Handler(void) __attribute__((noreturn));
void Default_Handler(void) __attribute__((noreturn));

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(uintptr_t)__stack_top,
    Reset_Handler,
    Default_Handler,   /* NMI */
    HardFault_Handler, /* HardFault */
    HardFault_Handler, /* MemManage */
    HardFault_Handler, /* BusFault */
    HardFault_Handler, /* UsageFault */
    0, 0, 0, 0,
    Default_Handler, /* SVCall */
    Default_Handler, /* DebugMonitor */
    0,
    Default_Handler, /* PendSV */
    Default_Handler, /* SysTick */
};

void Reset_Handler(void)
{
#if defined(__ARM_FP)
    /* Cortex-M4F: grant full access to CP10/CP11 before any floating-point instruction. */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
    for (uint32_t *src = __data_load, *dst = __data_start; dst < __data_end;) *dst++ = *src++;
    for (uint32_t *dst = __bss_start; dst < __bss_end;) *dst++ = 0;
#ifndef FW_NO_LIBC
    __heap_limit = (uint32_t)(uintptr_t)__stack_limit;
    initialise_monitor_handles();
#endif
    fw_exit(main());
}

void HardFault_Handler(void)
{
    /* A Rust panic traps with `udf` and lands here, as does any fault. */
    fw_write0("\nFAULT: hard fault (or a panic in the library)\n");
    fw_exit(1);
}

void Default_Handler(void)
{
    fw_write0("\nFAULT: unexpected exception\n");
    fw_exit(1);
}

void fw_exit(int code)
{
    /* ADP_Stopped_ApplicationExit -> QEMU exits 0; ADP_Stopped_RunTimeErrorUnknown -> 1. */
    for (;;) fw_semihost(0x18, (const void *)(uintptr_t)(code == 0 ? 0x20026u : 0x20023u));
}

#define FW_PAINT 0xC0FFEE11u

__attribute__((noinline)) void fw_stack_paint(void)
{
    uint32_t *p = __stack_limit;
    uint32_t *stop = (uint32_t *)(uintptr_t)(fw_sp() - 64u);
    while (p < stop) *p++ = FW_PAINT;
}

__attribute__((noinline)) uint32_t fw_stack_lowest(void)
{
    uint32_t *p = __stack_limit;
    while (p < __stack_top && *p == FW_PAINT) p++;
    return (uint32_t)(uintptr_t)p;
}

uint32_t fw_stack_size(void)
{
    return (uint32_t)((uintptr_t)__stack_top - (uintptr_t)__stack_limit);
}

__attribute__((noinline)) void fw_spin(uint32_t n)
{
    __asm__ volatile(".syntax unified\n1:\n\tsubs %0, %0, #1\n\tbne 1b\n\t.syntax divided" : "+l"(n) : : "cc");
}
