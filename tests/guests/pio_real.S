# PIO round trip, 16-bit real mode: DX = port, EAX = value; OUTs AL, AX, EAX to DX, then INs byte/word/dword from DX into EBX/ECX/ESI (zero-extended); HLT.
	.intel_syntax noprefix
	.code16
	.text
	.globl _start
_start:
	out	dx, al
	out	dx, ax
	out	dx, eax
	in	al, dx
	movzx	ebx, al
	in	ax, dx
	movzx	ecx, ax
	in	eax, dx
	mov	esi, eax
	hlt
