"""The synthetic world's vocabulary: concepts, colours, backgrounds, textures, caption templates
(English and eight other languages), junk captions, download errors and non-image payloads.

Everything here is plain data; `captions.py` turns it into text and `render.py` into pixels.
Indices into these tuples are the integer codes used throughout the generator and in
`_truth.parquet` (which stores the names, not the codes).
"""

from __future__ import annotations

# ---- concepts (the object drawn) --------------------------------------------------------
CONCEPTS: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon",
    "heart", "arrow", "crescent", "oval", "zigzag", "spiral", "pentagon",
)

# ---- colours: name -> base RGB ----------------------------------------------------------
COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "brown", "grey", "cyan",
)
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 50), "blue": (30, 70, 220), "yellow": (245, 220, 30),
    "orange": (250, 140, 20), "purple": (130, 40, 170), "pink": (250, 130, 190), "black": (15, 15, 15),
    "white": (250, 250, 250), "brown": (120, 70, 30), "grey": (128, 128, 128), "cyan": (30, 210, 220),
}

# ---- backgrounds (name as used in captions) ---------------------------------------------
BACKGROUNDS: tuple[str, ...] = ("white", "dark", "striped", "checkered", "gradient", "grainy", "dotted")
# (colour, background) pairs that would make the object invisible; never generated.
INCOMPATIBLE = {("white", "white"), ("black", "dark"), ("yellow", "white")}

# ---- object textures and the adjective a caption may use for them ------------------------
TEXTURES: tuple[str, ...] = ("solid", "noise", "gradient", "checker")
TEXTURE_WORD: dict[str, str] = {"solid": "", "noise": "speckled ", "gradient": "shaded ", "checker": "checkered "}

# ---- English caption templates ----------------------------------------------------------
# {op} is the object phrase "<mod><texture><colour> <object>", {col}/{obj} the bare words,
# {bg} the background name, {suf} an optional suffix. "a" before a vowel becomes "an".
EN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {op} on the table{suf}",
    "a {op} on a {bg} background{suf}",
    "{op} isolated on a {bg} background",
    "a close-up photo of a {op}{suf}",
    "an illustration of a {op} on a {bg} background",
    "a {op} in the middle of the picture",
    "the {obj} in this picture is {col}",
    "a drawing of a {op} with a {bg} background",
    "{op} icon on a {bg} background, flat design",
    "a {op} against a {bg} backdrop",
    "there is a {op} in the centre of the image",
    "photo of a single {op}{suf}",
    "graphic of a {op} on a {bg} background",
    "this is a {op}{suf}",
    "a picture showing a {op}",
    "a {op} shape drawn on a {bg} background",
    "I bought a new {op} sticker for my laptop",
    "{op} shown on a {bg} background",
    "a {op}, seen from above",
    "a {col} {obj} on a {bg} background",
)
# Which templates name the background (the text embedding then carries it too).
EN_TEMPLATE_HAS_BG: tuple[bool, ...] = tuple("{bg}" in t for t in EN_TEMPLATES)
EN_MODIFIERS: tuple[str, ...] = (
    "", "", "", "", "", "bright ", "small ", "large ", "simple ", "bold ", "pale ", "big ", "tiny ",
    "nice ", "beautiful ", "little ",
)
EN_SUFFIXES: tuple[str, ...] = (
    "", "", "", "", "", "", " in a minimalist style", ", high resolution", ", digital art",
    " with a soft shadow", ", vector illustration", " for a logo", ", photographed in the studio",
    " on the wall", " from my collection",
)

# ---- other languages: object with article, colour form that fits the templates -----------
# Templates are written so no inflection depends on the object's gender (e.g. "de couleur
# {col}" in French always takes the feminine adjective).
LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "it", "pt", "nl", "ru", "ja")
LANG_OBJECTS: dict[str, tuple[str, ...]] = {
    "de": ("ein Kreis", "ein Quadrat", "ein Dreieck", "ein Stern", "ein Ring", "ein Kreuz", "eine Raute",
           "ein Sechseck", "ein Herz", "ein Pfeil", "ein Halbmond", "ein Oval", "eine Zickzacklinie",
           "eine Spirale", "ein Fünfeck"),
    "fr": ("un cercle", "un carré", "un triangle", "une étoile", "un anneau", "une croix", "un losange",
           "un hexagone", "un cœur", "une flèche", "un croissant", "un ovale", "un zigzag", "une spirale",
           "un pentagone"),
    "es": ("un círculo", "un cuadrado", "un triángulo", "una estrella", "un anillo", "una cruz", "un rombo",
           "un hexágono", "un corazón", "una flecha", "una media luna", "un óvalo", "un zigzag",
           "una espiral", "un pentágono"),
    "it": ("un cerchio", "un quadrato", "un triangolo", "una stella", "un anello", "una croce", "un rombo",
           "un esagono", "un cuore", "una freccia", "una mezzaluna", "un ovale", "uno zigzag",
           "una spirale", "un pentagono"),
    "pt": ("um círculo", "um quadrado", "um triângulo", "uma estrela", "um anel", "uma cruz", "um losango",
           "um hexágono", "um coração", "uma seta", "uma meia-lua", "um oval", "um ziguezague",
           "uma espiral", "um pentágono"),
    "nl": ("een cirkel", "een vierkant", "een driehoek", "een ster", "een ring", "een kruis", "een ruit",
           "een zeshoek", "een hart", "een pijl", "een halve maan", "een ovaal", "een zigzaglijn",
           "een spiraal", "een vijfhoek"),
    "ru": ("круг", "квадрат", "треугольник", "звезда", "кольцо", "крест", "ромб", "шестиугольник",
           "сердце", "стрелка", "полумесяц", "овал", "зигзаг", "спираль", "пятиугольник"),
    "ja": ("円", "四角形", "三角形", "星", "輪", "十字", "ひし形", "六角形", "ハート", "矢印", "三日月",
           "楕円", "ジグザグ", "渦巻き", "五角形"),
}
LANG_COLOURS: dict[str, tuple[str, ...]] = {
    "de": ("Rot", "Grün", "Blau", "Gelb", "Orange", "Lila", "Rosa", "Schwarz", "Weiß", "Braun", "Grau", "Türkis"),
    "fr": ("rouge", "verte", "bleue", "jaune", "orange", "violette", "rose", "noire", "blanche", "marron",
           "grise", "turquoise"),
    "es": ("rojo", "verde", "azul", "amarillo", "naranja", "morado", "rosa", "negro", "blanco", "marrón",
           "gris", "turquesa"),
    "it": ("rosso", "verde", "blu", "giallo", "arancione", "viola", "rosa", "nero", "bianco", "marrone",
           "grigio", "turchese"),
    "pt": ("vermelha", "verde", "azul", "amarela", "laranja", "roxa", "rosa", "preta", "branca", "marrom",
           "cinza", "turquesa"),
    "nl": ("rood", "groen", "blauw", "geel", "oranje", "paars", "roze", "zwart", "wit", "bruin", "grijs",
           "turquoise"),
    "ru": ("красного", "зелёного", "синего", "жёлтого", "оранжевого", "фиолетового", "розового",
           "чёрного", "белого", "коричневого", "серого", "бирюзового"),
    "ja": ("赤", "緑", "青", "黄色", "オレンジ", "紫", "ピンク", "黒", "白", "茶色", "灰色", "水色"),
}
LANG_TEMPLATES: dict[str, tuple[str, ...]] = {
    "de": ("Auf diesem Bild ist {obj} in der Farbe {col} zu sehen",
           "Das ist {obj} in der Farbe {col} vor einem hellen Hintergrund",
           "Foto: {obj} in {col}, einfach und schön gezeichnet für unsere Webseite",
           "Hier ist {obj} in {col} auf einem schlichten Hintergrund"),
    "fr": ("Photo d'{obj} de couleur {col} sur un fond simple",
           "Sur cette image, on voit {obj} de couleur {col}",
           "Dessin d'{obj} de couleur {col} pour notre site internet",
           "Voici {obj} de couleur {col} sur un joli fond clair"),
    "es": ("Foto de {obj} de color {col} sobre un fondo sencillo",
           "En esta imagen se ve {obj} de color {col}",
           "Dibujo de {obj} de color {col} para nuestra página web",
           "Aquí tienes {obj} de color {col} con un fondo muy bonito"),
    "it": ("Foto di {obj} di colore {col} su uno sfondo semplice",
           "In questa immagine si vede {obj} di colore {col}",
           "Disegno di {obj} di colore {col} per il nostro sito",
           "Ecco {obj} di colore {col} con uno sfondo molto bello"),
    "pt": ("Uma fotografia de {obj} de cor {col} num fundo simples e bonito",
           "Nesta imagem podemos ver {obj} de cor {col}",
           "Desenho de {obj} de cor {col} para o nosso site",
           "Aqui está {obj} de cor {col} com um fundo muito bonito"),
    "nl": ("Foto van {obj} in de kleur {col} op een eenvoudige achtergrond",
           "Op deze afbeelding zie je {obj} in de kleur {col}",
           "Tekening van {obj} in de kleur {col} voor onze website",
           "Hier is {obj} in de kleur {col} met een mooie achtergrond"),
    "ru": ("Фотография: {obj} {col} цвета на простом светлом фоне",
           "Картинка для презентации: {obj} {col} цвета, простой рисунок",
           "Рисунок для нашего сайта: {obj} {col} цвета",
           "Простая иллюстрация, {obj} {col} цвета на белом фоне"),
    "ja": ("{col}の{obj}の写真です",
           "シンプルな背景に{col}の{obj}が描かれています",
           "{col}の{obj}のイラスト、無料素材",
           "これは{col}の{obj}の画像です"),
}

# ---- junk captions ----------------------------------------------------------------------
JUNK_KINDS: tuple[str, ...] = ("filename", "url", "one_word", "stock", "repeated", "empty")
# fastText would call these English (or they are English boilerplate); the rest have no language.
JUNK_LANG: dict[str, str | None] = {"filename": None, "url": None, "one_word": None, "stock": "en",
                                    "repeated": "en", "empty": None}
JUNK_ONE_WORD: tuple[str, ...] = ("image", "photo", "untitled", "thumbnail", "picture", "img", "null",
                                  "undefined", "jpg", "banner", "logo", "default", "Image")
JUNK_STOCK: tuple[str, ...] = (
    "stock photo royalty free image",
    "Stock Photo - Royalty Free Vector Illustration",
    "Image may contain: text",
    "click here to enlarge",
    "Shop now - free shipping on orders over $50",
    "High quality stock images and photos",
    "Buy this image - royalty free stock photography",
    "Product image 1 of 4",
    "No description available.",
    "Photo by unknown photographer. All rights reserved",
    "Click to view full size",
    "Sponsored content from our partners",
)
JUNK_REPEAT_WORDS: tuple[str, ...] = ("buy", "sale", "cheap", "best", "photo", "free", "SALE", "new", "hot")
JUNK_EMPTY: tuple[str, ...] = ("", " ", "-", "...", "N/A", "  \n ", "?", "none", ".")
JUNK_SITES: tuple[str, ...] = ("example-shop", "picture-host", "my-blog", "news-portal", "free-images",
                               "cdn-assets", "forum-uploads")

# ---- failed downloads (img2dataset error_message values) ---------------------------------
DOWNLOAD_ERRORS: tuple[str, ...] = (
    "HTTP Error 404: Not Found",
    "HTTP Error 404: Not Found",
    "HTTP Error 404: Not Found",
    "HTTP Error 403: Forbidden",
    "HTTP Error 403: Forbidden",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
    "HTTP Error 500: Internal Server Error",
    "<urlopen error [Errno 111] Connection refused>",
    "HTTP Error 410: Gone",
)

# ---- non-image payloads saved with an image extension ------------------------------------
NON_IMAGE_PAYLOADS: tuple[str, ...] = (
    "<!DOCTYPE html>\n<html>\n<head><title>404 Not Found</title></head>\n<body>\n<center><h1>404 Not Found"
    "</h1></center>\n<hr><center>nginx</center>\n</body>\n</html>\n",
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
    "<RequestId>{rid}</RequestId><HostId>{hid}</HostId></Error>",
    "<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title><meta http-equiv=\"refresh\" "
    "content=\"35\"></head><body><noscript>Enable JavaScript and cookies to continue</noscript>"
    "<div id=\"challenge\">{rid}</div></body></html>",
    '{{"error": "rate limited", "status": 429, "request_id": "{rid}"}}',
    "<html><head><title>Image not available</title></head><body><p>The image you requested has been "
    "removed or is temporarily unavailable.</p><p>ref {rid}</p></body></html>",
)

# ---- URL parts --------------------------------------------------------------------------
URL_HOSTS: tuple[str, ...] = (
    "http://example-cdn.test/images", "http://img1.example-cdn.test/i", "http://img2.example-cdn.test/i",
    "https://media.example-news.test/uploads", "https://shop.example-store.test/products/img",
    "http://static.example-blog.test/wp-content/uploads", "https://pics.example-forum.test/attachments",
    "http://cdn.example-stock.test/photos",
)
