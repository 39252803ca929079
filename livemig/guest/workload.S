/*
 * workload.S -- livemig's bare-metal dirty-memory workload (one 512-byte boot sector).
 *
 * Loaded at 0x7c00 and entered in real mode (CS:IP = 0:0x7c00, DL = 0x80), as a PC BIOS
 * hands over on QEMU's `pc` machine.  Only port 0x92, the CMOS at 0x70/0x71 and the UART
 * at 0x3f8 are used, so the same sector runs under QEMU/SeaBIOS and under livemig's VMM.
 *
 *   1. fast A20 (port 0x92), 32-bit protected mode;
 *   2. identity map of the first 16 GiB with 2 MiB pages (user-accessible, Accessed and Dirty
 *      preset so the CPU never writes the tables: while the loop runs, the only pages it
 *      dirties are those of the working set):
 *        PML4 @0x1000, PDPT @0x2000, 16 page directories @0x10000..0x1ffff;
 *   3. long mode; reads the RAM layout from CMOS:
 *        low RAM end  = 16 MiB + cmos[0x35:0x34] * 64 KiB      (if that value is nonzero)
 *                     = 1 MiB + cmos[0x31:0x30] * 1 KiB        (otherwise: guests <= 16 MiB)
 *        high RAM end = 4 GiB + cmos[0x5d:0x5c:0x5b] * 64 KiB
 *   4. drops to ring 3 (IOPL = 3, interrupts off) and runs the loop there: on kvm_pvm
 *      guest ring 0 is emulated instruction by instruction, ring 3 is not;
 *   5. optional prefill: one pass over all RAM from 1 MiB up, i.e. [1 MiB, low RAM end) +
 *      [4 GiB, high RAM end) (every page's first byte 0 -> 1; the < 1 MiB pages hold code);
 *   6. loops forever incrementing the FIRST byte of every 4 KiB page of the working set,
 *      in address order, and writes one character to COM1 per completed pass:
 *      '#' once when the loop starts, then '.' per pass ('\n' instead of every 64th '.').
 *      So the number of characters after the '#' == completed passes.
 *
 * Working set: ws_mib == 0: [1 MiB, low RAM end) + [4 GiB, high RAM end)
 *              ws_mib == N: [1 MiB, min(1 MiB + N MiB, low RAM end))
 * Code, stacks and page tables all live below 1 MiB, never in the working set; the loop makes
 * no stack writes (`pass` returns through %rbp).  Guest-physical space is mapped up to 16 GiB,
 * so RAM above 4 GiB may be at most 12 GiB.
 *
 * Patched options (little-endian dwords; keep in sync with livemig/guest/image.py):
 *   0x1f6  ws_mib   working-set size in MiB (0 = all RAM)
 *   0x1fa  prefill  nonzero = touch every page of all RAM once before the loop
 */
        .code16
        .text
        .globl _start
_start:
        cli
        cld
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        inb     $0x92, %al              /* fast A20, no reset */
        orb     $2, %al
        andb    $0xfe, %al
        outb    %al, $0x92
        lgdtl   gdt_desc
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $pm32

        .code32
pm32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $0x7c00, %esp
        xorl    %eax, %eax              /* clear PML4 + PDPT (0x1000..0x2fff) */
        movl    $0x1000, %edi
        movl    $0x800, %ecx
        rep stosl
        movl    $0x2027, 0x1000         /* PML4[0] -> PDPT, P|W|U|A */
        movl    $0x2000, %edi           /* PDPT[j] -> 0x10000 + j*4K, j < 16 */
        movl    $0x10027, %eax
        movb    $16, %cl                /* ecx == 0 after rep stosl */
1:      stosl
        scasl                           /* skip the high dword (already 0) */
        addl    $0x1000, %eax
        loop    1b
        movl    $0x10000, %edi          /* 8192 PDEs: i<<21 | P|W|U|A|D|PS */
        movl    $0xe7, %eax
        xorl    %edx, %edx
        movb    $0x20, %ch              /* ecx = 8192 */
2:      stosl
        xchgl   %eax, %edx
        stosl
        xchgl   %eax, %edx
        addl    $0x200000, %eax
        adcl    $0, %edx
        loop    2b
        movl    %cr4, %eax
        orl     $0x20, %eax             /* PAE */
        movl    %eax, %cr4
        movl    $0x1000, %eax
        movl    %eax, %cr3
        movl    $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        orl     $0x100, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000000, %eax       /* PG */
        movl    %eax, %cr0
        ljmp    $0x18, $lm64

        .code64
lm64:
        movl    $0x7c00, %esp
        xorl    %ebx, %ebx              /* r12 = low RAM end */
        movb    $0x35, %al
        call    cmos
        movb    $0x34, %al
        call    cmos
        testl   %ebx, %ebx
        jz      1f
        shlq    $16, %rbx
        addq    $0x1000000, %rbx
        jmp     2f
1:      movb    $0x31, %al
        call    cmos
        movb    $0x30, %al
        call    cmos
        shlq    $10, %rbx
        addq    $0x100000, %rbx
2:      movq    %rbx, %r12
        xorl    %ebx, %ebx              /* r13 = high RAM end */
        movb    $0x5d, %al
        call    cmos
        movb    $0x5c, %al
        call    cmos
        movb    $0x5b, %al
        call    cmos
        shlq    $16, %rbx
        xorl    %r15d, %r15d
        btsq    $32, %r15               /* r15 = 4 GiB */
        leaq    (%r15,%rbx), %r13
        pushq   $0x23                   /* iretq to ring 3: ss */
        pushq   $0x7000                 /* rsp */
        pushq   $0x3002                 /* rflags: IOPL 3, IF 0 */
        pushq   $0x2b                   /* cs: 64-bit user code */
        pushq   $user
        iretq

user:
        /* `pass` returns through %rbp (no stack writes: the loop dirties nothing but the working set) */
        cmpb    $0, prefill
        je      3f
        leaq    3f(%rip), %rbp
        jmp     pass                    /* prefill: all RAM once */
3:      movl    ws_mib, %eax
        testl   %eax, %eax
        jz      main_loop               /* 0: all RAM */
        shlq    $20, %rax
        addq    $0x100000, %rax
        cmpq    %r12, %rax
        cmovaq  %r12, %rax
        movq    %rax, %r12              /* low end = min(1 MiB + ws, low RAM end) */
        movq    %r15, %r13              /* no high part */
main_loop:
        movb    $0x23, %al              /* '#' */
        movw    $0x3f8, %dx
        outb    %al, %dx
        xorl    %r14d, %r14d            /* completed passes */
        leaq    5f(%rip), %rbp
        jmp     pass
5:      incl    %r14d
        movb    $0x2e, %al              /* '.' */
        testb   $63, %r14b
        jnz     6f
        movb    $0x0a, %al              /* '\n' every 64th pass */
6:      outb    %al, %dx
        /* fall through into the next pass */

        /* one pass: inc the first byte of each 4 KiB page of [1 MiB, r12) and [4 GiB, r13);
           returns with jmp *%rbp */
pass:
        movl    $0x100000, %edi
        jmp     8f
7:      incb    (%rdi)
        addq    $0x1000, %rdi
8:      cmpq    %r12, %rdi
        jb      7b
        movq    %r15, %rdi
        jmp     10f
9:      incb    (%rdi)
        addq    $0x1000, %rdi
10:     cmpq    %r13, %rdi
        jb      9b
        jmp     *%rbp

        /* rbx = rbx << 8 | cmos[al] */
cmos:   outb    %al, $0x70
        inb     $0x71, %al
        shlq    $8, %rbx
        movb    %al, %bl
        ret

        .p2align 3
gdt:                                    /* the null descriptor holds the GDT pseudo-descriptor */
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
        .word   0
        .quad   0x00cf9a000000ffff      /* 0x08: 32-bit code, ring 0 */
        .quad   0x00cf92000000ffff      /* 0x10: data, ring 0 */
        .quad   0x00af9a000000ffff      /* 0x18: 64-bit code, ring 0 */
        .quad   0x00cff2000000ffff      /* 0x20: data, ring 3 */
        .quad   0x00affa000000ffff      /* 0x28: 64-bit code, ring 3 */
gdt_end:

        .org    0x1f6
ws_mib: .long   0
prefill: .long  0
        .org    0x1fe
        .byte   0x55, 0xaa
