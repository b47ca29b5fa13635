/* C guest entry, 64-bit long mode, first in the image (guest.ld): RSP = stack top from the host, RDI = main's argument; zeroes .bss, calls int main(uint64_t arg), OUTs its return value (4 bytes) to GUEST_EXIT_PORT, then halts forever. */
#include "guest.h"

	.intel_syntax noprefix
	.code64
	.section .text.start, "ax"
	.globl _start
_start:
	and	rsp, -16		// the ABI wants RSP 16-aligned at every call
	cld				// the ABI also wants DF clear
	mov	r12, rdi		// rep stosb needs RDI
	mov	edi, offset __bss_start
	mov	ecx, offset __bss_end
	sub	ecx, edi
	xor	eax, eax
	rep stosb
	mov	rdi, r12
	call	main
	mov	dx, GUEST_EXIT_PORT
	out	dx, eax
1:	hlt
	jmp	1b

	.section .note.GNU-stack, "", @progbits
