"""Word pools the task programs draw from (fictional shops, goods, people and places)."""

from __future__ import annotations

STORES = [
    "Corner Pantry", "Blue Fern Market", "Harbor Grocer", "Maple Street Deli", "Sunrise Foods",
    "Oakline Hardware", "Pixel Electronics", "Greenleaf Pharmacy", "Northgate Books",
    "Riverbend Bakery", "Copper Kettle Cafe", "Silverline Sports", "Golden Wheat Bakery",
    "Juniper Home Goods", "Lantern Stationery", "Brightside Pet Supply", "Cedar Hill Market",
    "Quartz Office Supply", "Willow Garden Center", "Tidewater Fish Market",
]

# (item, low price, high price) in the currency's main unit
GOODS = [
    ("Oat Milk 1L", 1.8, 3.5), ("Sourdough Loaf", 3.2, 6.5), ("Free Range Eggs", 2.9, 5.8),
    ("Cheddar Block", 3.5, 8.9), ("Green Apples", 1.5, 4.2), ("Basmati Rice 2kg", 4.0, 9.5),
    ("Olive Oil 500ml", 5.5, 12.9), ("Ground Coffee", 6.0, 14.5), ("Dark Chocolate", 1.9, 4.9),
    ("Paper Towels", 3.0, 7.5), ("Dish Soap", 1.7, 4.4), ("AA Batteries 4pk", 3.9, 8.9),
    ("Notebook A5", 2.5, 6.0), ("Gel Pens 3pk", 2.2, 5.5), ("Desk Lamp", 18.0, 45.0),
    ("USB-C Cable", 6.5, 19.9), ("Phone Case", 9.0, 29.0), ("Garden Gloves", 4.5, 12.0),
    ("Seed Packet", 1.2, 3.5), ("Potting Soil", 5.0, 14.0), ("Dog Treats", 3.5, 9.9),
    ("Cat Litter", 6.0, 16.0), ("Tennis Balls", 4.0, 11.0), ("Water Bottle", 7.5, 22.0),
    ("Bagel", 0.9, 2.4), ("Croissant", 1.4, 3.6), ("Latte", 3.1, 5.4), ("Green Tea", 2.2, 4.1),
    ("Salmon Fillet", 7.9, 18.5), ("Lemon", 0.4, 1.2), ("Tomatoes", 2.1, 4.8),
    ("Bananas", 1.1, 2.9), ("Greek Yogurt", 1.6, 4.3), ("Pasta 500g", 1.3, 3.2),
]

FIRST_NAMES = [
    "Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Keira", "Luca", "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tessa",
    "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zoe",
]
LAST_NAMES = [
    "Almeida", "Brooks", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Hansen",
    "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov",
    "Quintero", "Rossi", "Schmidt", "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz", "Zielinski",
]

CITIES = [
    "Lisbon", "Porto", "Madrid", "Lyon", "Munich", "Krakow", "Vienna", "Prague",
    "Oslo", "Ghent", "Seville", "Bergen", "Zurich", "Dublin", "Leeds", "Bremen", "Graz",
    "Utrecht", "Malmo", "Bilbao", "Nantes", "Verona", "Tartu",
]

REGIONS = ["North", "South", "East", "West", "Central", "Coastal", "Highland", "Metro"]

DEPARTMENTS = [
    "Sales", "Support", "Research", "Finance", "Logistics", "Marketing", "Legal", "Design",
    "Operations", "Training",
]

PRODUCTS = [
    "Kettles", "Toasters", "Blenders", "Heaters", "Fans", "Lamps", "Routers", "Speakers",
    "Monitors", "Keyboards", "Backpacks", "Tents", "Bicycles", "Helmets", "Jackets",
]

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
FULL_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December"]
QUARTERS = ["Q1", "Q2", "Q3", "Q4"]

EXPENSES = [
    "Rent", "Salaries", "Marketing", "Utilities", "Travel", "Software", "Insurance",
    "Equipment", "Training", "Catering",
]

DRINKS = [
    "Espresso", "Cappuccino", "Flat White", "Mocha", "Chai Latte", "Hot Chocolate",
    "Iced Tea", "Lemonade", "Orange Juice", "Smoothie", "Americano", "Matcha",
]

STREETS = ["Elm St", "Harbor Rd", "King Ave", "Mill Lane", "Park Blvd", "Station Sq"]
