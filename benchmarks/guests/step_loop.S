# Single-step and breakpoint guest: 32-bit protected mode, an endless two-instruction loop that
# counts in EAX; the benchmarks step it or break on its first instruction (at the load address).
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	inc	eax
	jmp	_start
