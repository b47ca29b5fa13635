# Raises the exception EBX selects, 32-bit protected or 64-bit long mode (BITS=32|64), loadable anywhere: 0 #UD (ud2), 1 a load from [RSI] (a #PF when RSI is not mapped), 2 #DE (divide by zero), 3 #GP (int 0x40, beyond kvmkit's IDT), 4 #GP (DS loaded with selector 0x28, beyond kvmkit's GDT), 5 #BP (int3, a trap), 6 a call to RSI (a #PF on the fetch when RSI is not mapped), 7 a write to kvmkit's exception port 0xEF outside its stubs; then HLT. RAX = 0x5EED and RDI = 0xD1 before the exception (the stubs must keep them); clobbers RCX, RDX.
	.include "bits.inc"
	.text
	.globl _start
_start:
	mov	eax, 0x5eed
	mov	edi, 0xd1
	cmp	ebx, 1
	je	load
	cmp	ebx, 2
	je	divide
	cmp	ebx, 3
	je	beyond_idt
	cmp	ebx, 4
	je	bad_selector
	cmp	ebx, 5
	je	breakpoint
	cmp	ebx, 6
	je	call_away
	cmp	ebx, 7
	je	stray_report
	.globl	invalid
invalid:
	ud2
	hlt
	.globl	load
load:
	.if BITS == 64
	mov	ecx, [rsi]
	.else
	mov	ecx, [esi]
	.endif
	hlt
divide:
	xor	ecx, ecx
	xor	edx, edx
	.globl	divide_insn
divide_insn:
	div	ecx
	hlt
beyond_idt:
	int	0x40
	hlt
bad_selector:
	mov	ecx, 0x28
	mov	ds, ecx
	hlt
breakpoint:
	int3
	.globl	after_int3
after_int3:
	hlt
call_away:
	.if BITS == 64
	call	rsi
	.else
	call	esi
	.endif
	hlt
stray_report:
	out	0xef, al
	hlt
